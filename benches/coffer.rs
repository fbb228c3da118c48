//! Benchmarks, from the pure state machine out to HTTP on loopback. Every engine and HTTP
//! figure is fully durable (each acknowledged operation was fdatasync'ed).
//!
//! `cargo bench --bench coffer` runs them all; `cargo bench --bench coffer -- engine` one group.
//! On a shared 2-core machine compare figures taken in one run, not across runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::domain::{
    Account, AccountId, Currency, Decision, Event, EventBody, Fresh, IdempotencyKey, Metadata,
    Request, Retention,
};
use coffer::wal::{self, codec, Wal, WalStart};
use coffer::{Engine, EngineConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn opened(id: &AccountId) -> Account {
    let event = Event {
        lsn: 1,
        account: id.clone(),
        seq: 0,
        at_ms: 0,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency: Currency::parse("GEM").expect("currency"),
            overdraft_limit: 0,
            metadata: Metadata::empty(),
        },
        outcome: None,
    };
    let mut account = Account::open(&event).expect("open");
    let credit = Event {
        lsn: 2,
        seq: 1,
        body: EventBody::Credit {
            amount: coffer::domain::Amount::new(1 << 50).expect("amount"),
            metadata: Metadata::empty(),
        },
        ..event
    };
    account
        .apply(&credit, Retention::UNLIMITED)
        .expect("credit");
    account
}

/// Opens `count` accounts named `{prefix}{i}`, each credited with 2^50.
async fn seed_accounts(engine: &Engine, prefix: &str, count: u64) {
    let mut batch = Vec::new();
    for i in 0..count {
        let id = AccountId::parse(&format!("{prefix}{i}")).expect("id");
        let currency = Currency::parse("GEM").expect("currency");
        engine
            .open_account(id.clone(), currency, 0, Metadata::empty())
            .await
            .expect("open account");
        let credit = Request::Credit {
            amount: 1 << 50,
            metadata: BTreeMap::new(),
        };
        batch.push((
            id,
            Some(IdempotencyKey::parse("seed").expect("key")),
            credit,
        ));
        if batch.len() == 1000 || i + 1 == count {
            for result in engine.execute_batch(std::mem::take(&mut batch)).await {
                result.expect("seed credit");
            }
        }
    }
}

/// decide + apply of a keyed debit: the domain's cost per operation, no I/O.
fn domain(c: &mut Criterion) {
    let mut group = c.benchmark_group("domain");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decide_apply_debit", |b| {
        let id = AccountId::parse("bench").expect("id");
        b.iter_custom(|iters| {
            let mut account = opened(&id);
            let mut lsn = 2;
            let started = Instant::now();
            for i in 0..iters {
                // A fresh account every 100k operations keeps history memory bounded.
                if i % 100_000 == 0 && i > 0 {
                    account = opened(&id);
                    lsn = 2;
                }
                let key = IdempotencyKey::parse(&format!("k{i}")).expect("key");
                let request = Request::Debit {
                    amount: 1,
                    metadata: BTreeMap::new(),
                };
                let fresh = Fresh {
                    now_ms: 1,
                    hold_id: Uuid::nil(),
                };
                let Ok(Decision::Apply(body)) = account.decide(Some(&key), &request, fresh) else {
                    panic!("debit refused");
                };
                lsn += 1;
                let event = Event {
                    lsn,
                    account: id.clone(),
                    seq: account.seq() + 1,
                    at_ms: 1,
                    tx_id: Uuid::nil(),
                    idempotency_key: Some(key),
                    body,
                    outcome: None,
                };
                account.apply(&event, Retention::UNLIMITED).expect("apply");
            }
            started.elapsed()
        });
    });
    group.finish();
}

/// WAL append + group commit on a real file: `n` records queued, then one wait for the last.
fn wal_group_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let rt = runtime();
    let id = AccountId::parse("bench").expect("id");
    let event = Event {
        lsn: 0,
        account: id,
        seq: 7,
        at_ms: 1_700_000_000_000,
        tx_id: Uuid::from_u128(7),
        idempotency_key: Some(IdempotencyKey::parse("order-12345678").expect("key")),
        body: EventBody::Debit {
            amount: coffer::domain::Amount::new(1).expect("amount"),
            metadata: Metadata::empty(),
        },
        outcome: None,
    };
    let mut payload = Vec::new();
    codec::encode_event(&event, &mut payload);
    for batch in [1u64, 16, 256, 4096] {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(
            BenchmarkId::new("append_sync", batch),
            &batch,
            |b, &batch| {
                let dir = tempfile::tempdir().expect("tempdir");
                let log = Wal::start(WalStart {
                    storage: std::sync::Arc::new(coffer::storage::FileStorage),
                    mode: wal::WriterMode::Thread,
                    dir: dir.path().join("wal"),
                    last_lsn: 0,
                    last_segment: None,
                    segment_bytes_max: wal::SEGMENT_BYTES_DEFAULT,
                })
                .expect("wal");
                b.iter(|| {
                    let mut last = 0;
                    for _ in 0..batch {
                        last = log.append(&payload).expect("append");
                    }
                    rt.block_on(log.wait_durable(last)).expect("durable");
                });
            },
        );
    }
    group.finish();
}

/// The engine in process, fully durable: `tasks` concurrent clients debit accounts chosen
/// uniformly among 100,000, or all one hot account.
fn engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts: u64 = 100_000;
    let engine = rt.block_on(async {
        let (engine, _) = Engine::open(EngineConfig::new(dir.path())).expect("open");
        engine.finish_recovery().await.expect("recover");
        seed_accounts(&engine, "a", accounts).await;
        engine
    });
    let counter = Arc::new(AtomicU64::new(0));
    for (name, hot) in [("uniform_100k", false), ("hot", true)] {
        for tasks in [64u64, 512] {
            group.bench_function(BenchmarkId::new(name, tasks), |b| {
                b.iter_custom(|iters| {
                    let engine = engine.clone();
                    let counter = counter.clone();
                    rt.block_on(async move {
                        let started = Instant::now();
                        let per_task = iters.div_ceil(tasks);
                        let mut handles = Vec::new();
                        for t in 0..tasks {
                            let engine = engine.clone();
                            let counter = counter.clone();
                            handles.push(tokio::spawn(async move {
                                for i in 0..per_task {
                                    let n = counter.fetch_add(1, Ordering::Relaxed);
                                    let account = if hot { 0 } else { (n * 7919 + t) % accounts };
                                    let id = AccountId::parse(&format!("a{account}")).expect("id");
                                    let key =
                                        IdempotencyKey::parse(&format!("b{n}-{i}")).expect("k");
                                    let request = Request::Debit {
                                        amount: 1,
                                        metadata: BTreeMap::new(),
                                    };
                                    engine
                                        .execute(&id, Some(key), request)
                                        .await
                                        .expect("debit");
                                }
                            }));
                        }
                        for h in handles {
                            h.await.expect("task");
                        }
                        started.elapsed()
                    })
                });
            });
        }
    }
    group.bench_function("batch_1000_uniform", |b| {
        group_batch(b, &rt, &engine, &counter, accounts);
    });
    group.finish();
}

fn group_batch(
    b: &mut criterion::Bencher,
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    counter: &Arc<AtomicU64>,
    accounts: u64,
) {
    b.iter_custom(|iters| {
        let engine = engine.clone();
        let counter = counter.clone();
        rt.block_on(async move {
            // 16 concurrent batches of 1,000 operations each, `iters` operations in all.
            let batches = iters.div_ceil(1000);
            let started = Instant::now();
            let mut handles = Vec::new();
            for worker in 0..16u64 {
                let engine = engine.clone();
                let counter = counter.clone();
                handles.push(tokio::spawn(async move {
                    let mut b = worker;
                    while b < batches {
                        let ops = (0..1000u64)
                            .map(|_| {
                                let n = counter.fetch_add(1, Ordering::Relaxed);
                                let id = AccountId::parse(&format!("a{}", (n * 7919) % accounts))
                                    .expect("id");
                                let key = IdempotencyKey::parse(&format!("c{n}")).expect("key");
                                let request = Request::Debit {
                                    amount: 1,
                                    metadata: BTreeMap::new(),
                                };
                                (id, Some(key), request)
                            })
                            .collect();
                        for result in engine.execute_batch(ops).await {
                            result.expect("debit");
                        }
                        b += 16;
                    }
                }));
            }
            for h in handles {
                h.await.expect("task");
            }
            started.elapsed() * u32::try_from(iters.max(1)).unwrap_or(u32::MAX)
                / u32::try_from((batches * 1000).max(1)).unwrap_or(u32::MAX)
        })
    });
}

/// HTTP end to end on loopback: a real server in process, `connections` keep-alive
/// hyper connections each sending debits of 1 (uniform over 10,000 accounts), fully durable.
fn http(c: &mut Criterion) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let mut group = c.benchmark_group("http");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts: u64 = 10_000;
    let server = rt.block_on(async {
        let server = coffer::Server::start("127.0.0.1:0", EngineConfig::new(dir.path()))
            .await
            .expect("server");
        let engine = server.engine().expect("ready").clone();
        seed_accounts(&engine, "h", accounts).await;
        server
    });
    let addr = server.addr();
    let counter = Arc::new(AtomicU64::new(0));
    for connections in [16u64, 64] {
        group.bench_function(BenchmarkId::new("debit_uniform", connections), |b| {
            b.iter_custom(|iters| {
                let counter = counter.clone();
                rt.block_on(async move {
                    let per_conn = iters.div_ceil(connections);
                    let started = Instant::now();
                    let mut handles = Vec::new();
                    for _ in 0..connections {
                        let counter = counter.clone();
                        handles.push(tokio::spawn(async move {
                            let stream =
                                tokio::net::TcpStream::connect(addr).await.expect("connect");
                            stream.set_nodelay(true).expect("nodelay");
                            let (mut sender, conn) = hyper::client::conn::http1::handshake(
                                hyper_util::rt::TokioIo::new(stream),
                            )
                            .await
                            .expect("handshake");
                            tokio::spawn(conn);
                            for _ in 0..per_conn {
                                let n = counter.fetch_add(1, Ordering::Relaxed);
                                let request = hyper::Request::post(format!(
                                    "/v1/accounts/h{}/debits",
                                    (n * 7919) % accounts
                                ))
                                .header("host", "bench")
                                .header("idempotency-key", format!("e{n}"))
                                .body(Full::new(Bytes::from_static(br#"{"amount":1}"#)))
                                .expect("request");
                                sender.ready().await.expect("ready");
                                let response = sender.send_request(request).await.expect("send");
                                assert_eq!(response.status(), 201);
                                response.into_body().collect().await.expect("body");
                            }
                        }));
                    }
                    for h in handles {
                        h.await.expect("task");
                    }
                    started.elapsed() * u32::try_from(iters.max(1)).unwrap_or(u32::MAX)
                        / u32::try_from((per_conn * connections).max(1)).unwrap_or(u32::MAX)
                })
            });
        });
    }
    group.finish();
    rt.block_on(server.shutdown());
}

criterion_group!(benches, domain, wal_group_commit, engine, http);
criterion_main!(benches);
