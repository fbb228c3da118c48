//! Replay on several threads (`EngineConfig::replay_threads`) gives exactly what one thread
//! gives: the same accounts, histories, keys and transfers, and, on a log with a bad record
//! in the middle, the same error naming the same file and offset, with nothing cut.

use std::collections::BTreeMap;
use std::path::Path;

use coffer::domain::{AccountId, Currency, Event, EventBody, IdempotencyKey, Metadata, Request};
use coffer::wal::codec::{encode_event, encode_frame};
use coffer::{Engine, EngineConfig};
use uuid::Uuid;

fn config(dir: &Path, threads: usize) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.snapshot_every_records = None;
    config.snapshot_interval = None;
    config.expiry_sweep = None;
    config.segment_bytes_max = 64 * 1024;
    config.replay_threads = threads;
    config
}

fn id(n: usize) -> AccountId {
    AccountId::parse(&format!("acct-{n}")).expect("id")
}

fn key(text: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::parse(text).expect("key"))
}

/// Fills a data directory with accounts, credits, debits, holds and transfers over several
/// segments.
async fn populate(dir: &Path) -> usize {
    let (engine, _) = Engine::open(config(dir, 1)).expect("open");
    engine.finish_recovery().await.expect("recover");
    let accounts = 40;
    let gem = Currency::parse("GEM").expect("currency");
    for n in 0..accounts {
        engine
            .open_account(id(n), gem.clone(), 0, Metadata::empty())
            .await
            .expect("open account");
    }
    for round in 0..30 {
        for n in 0..accounts {
            let k = format!("r{round}");
            let request = match round % 3 {
                0 => Request::Credit {
                    amount: 100 + n as i128,
                    metadata: BTreeMap::new(),
                },
                1 => Request::Hold {
                    amount: 5,
                    expires_in_secs: None,
                    metadata: BTreeMap::new(),
                },
                _ => Request::Debit {
                    amount: 3,
                    metadata: BTreeMap::from([("round".to_string(), round.to_string())]),
                },
            };
            engine
                .execute(&id(n), key(&k), request)
                .await
                .expect("request");
            let transfer = Request::Transfer {
                to: id((n * 7 + round) % accounts),
                amount: 2,
                metadata: BTreeMap::new(),
            };
            if (n * 7 + round) % accounts != n {
                engine
                    .transfer(&id(n), key(&format!("t{round}")), transfer)
                    .await
                    .expect("transfer");
            }
        }
    }
    engine.shutdown();
    accounts
}

/// Everything an engine shows of its accounts and transfers.
async fn state(engine: &Engine, accounts: usize) -> Vec<String> {
    let mut out = Vec::new();
    for n in 0..accounts {
        let view = engine.account(&id(n)).await.expect("account");
        let (history, _) = engine
            .transactions(&id(n), None, 1000)
            .await
            .expect("history");
        let (holds, _) = engine.holds(&id(n), None, None, 1000).await.expect("holds");
        out.push(format!("{view:?} {history:?} {holds:?}"));
        for tx in history.iter().filter_map(|t| t.transfer_id) {
            let record = engine.transfer_record(&tx).await.expect("transfer");
            out.push(format!("{record:?}"));
        }
    }
    out
}

#[tokio::test]
async fn several_threads_rebuild_exactly_what_one_thread_rebuilds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts = populate(dir.path()).await;
    let mut seen = Vec::new();
    for threads in [1, 2, 3] {
        let (engine, report) = Engine::open(config(dir.path(), threads)).expect("open");
        assert!(report.records > 3000, "{report:?}");
        seen.push(state(&engine, accounts).await);
        assert!(engine.conservation().holds());
        engine.shutdown();
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
}

#[tokio::test]
async fn a_bad_event_in_the_middle_is_named_alike_by_one_and_by_several_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path()).await;
    // Two checksum-valid records that apply refuses, then a good one after them (so they are
    // not a torn tail): a credit to an account never opened, and a second open of acct-3.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .expect("wal")
        .map(|e| e.expect("entry").path())
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment").clone();
    let (engine, report) = Engine::open(config(dir.path(), 1)).expect("open");
    engine.shutdown();
    drop(engine);
    let mut frames = Vec::new();
    let bodies = [
        (
            AccountId::parse("ghost").expect("id"),
            1,
            EventBody::Credit {
                amount: coffer::domain::Amount::new(5).expect("amount"),
                metadata: Metadata::empty(),
            },
        ),
        (
            id(3),
            0,
            EventBody::Opened {
                currency: Currency::parse("GEM").expect("currency"),
                overdraft_limit: 0,
                metadata: Metadata::empty(),
            },
        ),
        (
            AccountId::parse("fresh").expect("id"),
            0,
            EventBody::Opened {
                currency: Currency::parse("GEM").expect("currency"),
                overdraft_limit: 0,
                metadata: Metadata::empty(),
            },
        ),
    ];
    for (lsn, (account, seq, body)) in (report.last_lsn + 1..).zip(bodies) {
        let event = Event {
            lsn,
            account,
            seq,
            at_ms: 1_900_000_000_000,
            tx_id: if seq == 0 {
                Uuid::nil()
            } else {
                Uuid::now_v7()
            },
            idempotency_key: None,
            body,
            outcome: None,
        };
        let mut payload = Vec::new();
        encode_event(&event, &mut payload);
        encode_frame(event.lsn, &payload, &mut frames);
    }
    let bytes = std::fs::read(&last).expect("read");
    let end = report
        .tail_cut
        .as_ref()
        .map_or_else(|| zero_end(&bytes), |cut| cut.offset as usize);
    // A checksum-valid record whose payload does not decode (an unknown event tag).
    let mut undecodable = Vec::new();
    let mut payload = Vec::new();
    encode_event(
        &Event {
            lsn: report.last_lsn + 1,
            account: id(5),
            seq: 1,
            at_ms: 1_900_000_000_000,
            tx_id: Uuid::now_v7(),
            idempotency_key: None,
            body: EventBody::Expire {
                hold_id: Uuid::now_v7(),
            },
            outcome: None,
        },
        &mut payload,
    );
    let tag_at = payload.len() - 18; // the tag, the outcome flag, then the hold id
    payload[tag_at] = 99;
    encode_frame(report.last_lsn + 1, &payload, &mut undecodable);
    let mut rest = Vec::new();
    let mut offset = 0;
    while let Ok((frame, size)) = coffer::wal::codec::decode_frame(&frames[offset..]) {
        if frame.lsn > report.last_lsn + 1 {
            rest.extend_from_slice(&frames[offset..offset + size]);
        }
        offset += size;
    }
    let cases = [
        ("unknown account ghost", frames.clone()),
        ("unknown event tag", [undecodable, rest].concat()),
    ];
    for (what, appended) in cases {
        let mut damaged = bytes[..end].to_vec();
        damaged.extend_from_slice(&appended);
        std::fs::write(&last, &damaged).expect("write");
        let mut errors = Vec::new();
        for threads in [1, 2, 3] {
            match Engine::open(config(dir.path(), threads)) {
                Ok((engine, _)) => {
                    engine.shutdown();
                    panic!("a log with a bad record opened on {threads} threads");
                }
                Err(error) => errors.push(error.to_string()),
            }
        }
        assert!(
            errors[0].contains(what) && errors[0].contains(&format!("offset {end}")),
            "{}",
            errors[0]
        );
        assert_eq!(errors[0], errors[1]);
        assert_eq!(errors[0], errors[2]);
        assert_eq!(
            std::fs::read(&last).expect("read"),
            damaged,
            "nothing was cut or changed"
        );
    }
}

/// Where the records of a segment end: the zero-filled rest starts there.
fn zero_end(bytes: &[u8]) -> usize {
    let mut offset = 0;
    while let Ok((_, size)) = coffer::wal::codec::decode_frame(&bytes[offset..]) {
        offset += size;
    }
    offset
}
