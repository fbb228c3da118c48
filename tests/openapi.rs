//! The OpenAPI document served at `GET /openapi.json` is generated from the code: each
//! handler's `#[utoipa::path]` and the request and response types. The router and the
//! document are built from one list of routes (`coffer::http::route_table()`); these tests
//! check that the list, the router and the document agree, and that the document is as
//! precise as the contract: bounds, patterns, formats, closed objects, the idempotency key,
//! errors as problem+json.

mod common;

use std::collections::BTreeSet;

use coffer::domain::{AMOUNT_MAX, HOLD_EXPIRES_SECS_MAX};
use coffer::http::schema::{ACCOUNT_ID_PATTERN, CURRENCY_PATTERN, IDEMPOTENCY_KEY_PATTERN};
use common::TestServer;
use serde_json::{json, Value};

/// The POST endpoints that move money: each must require an `Idempotency-Key` header.
const MONEY_MOVING: &[&str] = &[
    "/v1/accounts/{id}/credits",
    "/v1/accounts/{id}/debits",
    "/v1/accounts/{id}/holds",
    "/v1/accounts/{id}/holds/{hold_id}/capture",
    "/v1/accounts/{id}/holds/{hold_id}/release",
    "/v1/transfers",
];

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(coffer::http::openapi_json()).expect("the document is valid JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let schema = &doc["components"]["schemas"][name];
    assert!(schema.is_object(), "components.schemas.{name} is missing");
    schema
}

#[test]
fn it_is_openapi_3_1() {
    // Goal: clients and tools read the document as OpenAPI 3.1.x.
    let doc = document();
    let version = doc["openapi"].as_str().expect("an openapi version string");
    assert!(
        version.starts_with("3.1."),
        "openapi is {version}, not 3.1.x"
    );
    assert!(doc["info"]["title"].is_string(), "info.title");
    assert!(doc["info"]["version"].is_string(), "info.version");
}

#[test]
fn the_document_has_exactly_the_routes_of_the_route_table() {
    // Goal: every route the router is built from is documented with its methods, and the
    // document names no path or method the router does not serve.
    let doc = document();
    let paths = doc["paths"].as_object().expect("a paths object");
    let table = coffer::http::route_table();
    assert!(table.len() >= 18, "the route table has every endpoint");
    let routed_pairs: BTreeSet<(String, String)> = table
        .iter()
        .flat_map(|r| r.methods.iter().map(|m| (r.path.clone(), m.clone())))
        .collect();
    let mut documented_pairs = BTreeSet::new();
    for (path, item) in paths {
        for method in HTTP_METHODS {
            if item.get(*method).is_some_and(Value::is_object) {
                documented_pairs.insert((path.clone(), method.to_string()));
            }
        }
    }
    assert_eq!(routed_pairs, documented_pairs);
    let routed: BTreeSet<&str> = table.iter().map(|r| r.path.as_str()).collect();
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    assert_eq!(routed, documented);
}

#[test]
fn the_router_serves_exactly_the_documented_paths() {
    // Goal: the paths in the built axum router (read from its Debug form, the only place it
    // lists them) are exactly the documented ones, so a route added to the router by hand,
    // outside the documented table, fails here.
    let router = coffer::http::router(coffer::http::AppState::new());
    let debug = format!("{router:?}");
    let doc = document();
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let mut served = BTreeSet::new();
    for piece in debug.split('"') {
        let looks_like_a_route = (piece.starts_with("/v1/")
            || piece == "/healthz"
            || piece == "/readyz"
            || piece == "/metrics"
            || piece == "/openapi.json")
            && !piece.contains(' ');
        if looks_like_a_route {
            served.insert(piece.to_string());
        }
    }
    assert!(
        !served.is_empty(),
        "the router's Debug form lists no path; the test must find another way in:\n{debug}"
    );
    assert_eq!(served, documented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_and_the_served_document_is_this_one() {
    // Goal: a request to each documented path and method reaches a handler (never the 404
    // `not_found` or 405 `method_not_allowed` fallbacks), and GET /openapi.json serves the
    // generated document.
    let ts = TestServer::start().await;
    let doc = document();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let concrete = path
            .replace(
                "{id}",
                if path.starts_with("/v1/transfers") {
                    "0193a5c4-7d2e-7f00-8000-000000000001"
                } else {
                    "nobody"
                },
            )
            .replace("{hold_id}", "0193a5c4-7d2e-7f00-8000-000000000001")
            .replace("{key}", "k1");
        for method in HTTP_METHODS {
            if item.get(*method).is_none() {
                continue;
            }
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
            let response = ts
                .client
                .request(method.clone(), ts.url(&concrete))
                .header("idempotency-key", "k1")
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("answered");
            let status = response.status().as_u16();
            let text = response.text().await.expect("a body");
            let code = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_string));
            assert!(
                !matches!(code.as_deref(), Some("not_found" | "method_not_allowed")),
                "{method} {concrete}: {status} {text}"
            );
        }
    }
    let served: Value = ts.get_json("/openapi.json").await;
    assert_eq!(served, doc);
}

#[test]
fn every_operation_documents_its_path_parameters_and_errors_as_problems() {
    // Goal: each `{param}` of a path is declared, every operation has a success answer, and
    // every error status answers problem+json with an example of each of its codes.
    let doc = document();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let declared: Vec<String> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| format!("{{{}}}", p["name"].as_str().unwrap_or_default()))
                .collect();
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                assert!(
                    declared.iter().any(|d| d == segment),
                    "{method} {path}: path parameter {segment} is not declared"
                );
            }
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path}: no success response"
            );
            for (status, response) in responses {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                let content = &response["content"]["application/problem+json"];
                assert_eq!(
                    content["schema"]["$ref"], "#/components/schemas/Problem",
                    "{method} {path}: {status} is not a Problem"
                );
                let examples = content["examples"].as_object().expect("examples");
                assert!(!examples.is_empty(), "{method} {path}: {status} examples");
                for example in examples.values() {
                    assert_eq!(
                        example["value"]["status"].as_u64().map(|s| s.to_string()),
                        Some(status.clone()),
                        "{method} {path}: an example of {status} has another status"
                    );
                }
            }
            if operation["security"] != serde_json::json!([{}]) {
                assert!(
                    responses.contains_key("401"),
                    "{method} {path}: a guarded operation documents 401"
                );
            }
        }
    }
}

#[test]
fn money_moving_posts_require_an_idempotency_key() {
    // Goal: the contract's rule "every POST that moves money needs a key" is in the document,
    // with the key's format, and each success documents Idempotent-Replayed.
    let doc = document();
    for path in MONEY_MOVING {
        let operation = &doc["paths"][*path]["post"];
        let key = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["in"] == "header" && p["name"] == "Idempotency-Key")
            .unwrap_or_else(|| panic!("POST {path}: no Idempotency-Key"));
        assert_eq!(key["required"], true, "POST {path}");
        assert_eq!(key["schema"]["pattern"], IDEMPOTENCY_KEY_PATTERN);
        assert_eq!(key["schema"]["minLength"], 1);
        assert_eq!(key["schema"]["maxLength"], 255);
        let responses = operation["responses"].as_object().expect("responses");
        for (status, response) in responses.iter().filter(|(s, _)| s.starts_with('2')) {
            assert!(
                response["headers"]["Idempotent-Replayed"].is_object(),
                "POST {path} {status}: no Idempotent-Replayed"
            );
        }
        for status in ["400", "422"] {
            assert!(responses.contains_key(status), "POST {path}: {status}");
        }
    }
}

#[test]
fn bounds_patterns_and_formats_are_the_contracts() {
    // Goal: the document states the contract's limits exactly: amounts 1..=2^53-1, the id and
    // currency patterns, UUID path ids, list limits, hold lifetimes, closed request bodies.
    let doc = document();
    for name in ["MoveRequest", "HoldRequest", "TransferRequest"] {
        let amount = &schema(&doc, name)["properties"]["amount"];
        assert_eq!(amount["type"], "integer", "{name}.amount");
        assert_eq!(amount["minimum"], 1, "{name}.amount");
        assert_eq!(amount["maximum"], AMOUNT_MAX, "{name}.amount");
    }
    let overdraft = &schema(&doc, "AccountRequest")["properties"]["overdraft_limit"];
    assert_eq!(overdraft["minimum"], 0);
    assert_eq!(overdraft["maximum"], AMOUNT_MAX);
    let expires = &schema(&doc, "HoldRequest")["properties"]["expires_in_secs"];
    assert_eq!(expires["minimum"], 1);
    assert_eq!(expires["maximum"], HOLD_EXPIRES_SECS_MAX);
    assert_eq!(schema(&doc, "AccountId")["pattern"], ACCOUNT_ID_PATTERN);
    assert_eq!(ACCOUNT_ID_PATTERN, "^[A-Za-z0-9._:-]{1,128}$");
    assert_eq!(schema(&doc, "Currency")["pattern"], CURRENCY_PATTERN);
    assert_eq!(CURRENCY_PATTERN, "^[A-Z0-9_]{1,16}$");
    let metadata = schema(&doc, "Metadata");
    assert_eq!(metadata["maxProperties"], 16);
    assert_eq!(metadata["propertyNames"]["maxLength"], 40);
    assert_eq!(metadata["additionalProperties"]["maxLength"], 500);
    for name in [
        "AccountRequest",
        "MoveRequest",
        "HoldRequest",
        "CaptureRequest",
        "ReleaseRequest",
        "TransferRequest",
        "BatchRequest",
        "Account",
        "Transaction",
        "Hold",
        "Receipt",
        "HoldReceipt",
        "Transfer",
        "TransferReceipt",
        "Problem",
    ] {
        assert_eq!(
            schema(&doc, name)["additionalProperties"],
            false,
            "{name} must be closed: unknown fields are refused"
        );
    }
    let paths = &doc["paths"];
    for (path, method, name) in [
        ("/v1/accounts/{id}/holds/{hold_id}", "get", "hold_id"),
        (
            "/v1/accounts/{id}/holds/{hold_id}/capture",
            "post",
            "hold_id",
        ),
        (
            "/v1/accounts/{id}/holds/{hold_id}/release",
            "post",
            "hold_id",
        ),
        ("/v1/transfers/{id}", "get", "id"),
    ] {
        let parameter = paths[path][method]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{path}: {name}"));
        assert_eq!(parameter["schema"]["format"], "uuid", "{path}: {name}");
    }
    let account_id = paths["/v1/accounts/{id}"]["get"]["parameters"][0]["schema"]["$ref"].clone();
    assert_eq!(account_id, "#/components/schemas/AccountId");
    let holds = paths["/v1/accounts/{id}/holds"]["get"]["parameters"]
        .as_array()
        .expect("parameters");
    let limit = holds.iter().find(|p| p["name"] == "limit").expect("limit");
    assert_eq!(limit["schema"]["anyOf"][0]["minimum"], 1);
    assert_eq!(limit["schema"]["anyOf"][0]["maximum"], 1000);
}

#[test]
fn query_parameters_are_their_exact_value_or_empty() {
    // Goal: every query parameter is documented as its exact non-empty form (bounds, format,
    // enum unchanged) or the empty string, which the server takes as absent (docs/API.md's URL
    // template `?status=open&limit=&after=`), so the document and the server agree.
    let doc = document();
    let empty = json!({"type": "string", "maxLength": 0});
    let expected = [
        (
            "/v1/accounts/{id}/holds",
            "status",
            json!({"type": "string", "enum": ["open", "captured", "released", "expired"]}),
        ),
        (
            "/v1/accounts/{id}/holds",
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        ),
        (
            "/v1/accounts/{id}/holds",
            "after",
            json!({"type": "string", "format": "uuid"}),
        ),
        (
            "/v1/accounts/{id}/transactions",
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        ),
        (
            "/v1/accounts/{id}/transactions",
            "before_seq",
            json!({"type": "integer", "minimum": 1, "maximum": u64::MAX}),
        ),
        (
            "/v1/events",
            "after",
            json!({"type": "string", "pattern": "^e[0-9a-f]{16}$", "examples": ["e00000000000003e8"]}),
        ),
        (
            "/v1/events",
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        ),
        (
            "/v1/events",
            "wait_ms",
            json!({"type": "integer", "minimum": 0, "maximum": 30000, "default": 0}),
        ),
        (
            "/v1/events",
            "account",
            json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$", "minLength": 1, "maxLength": 128}),
        ),
        (
            "/v1/events",
            "kind",
            json!({"type": "string", "enum": ["credit", "debit", "hold", "capture", "release", "expire", "transfer_out", "transfer_in"]}),
        ),
    ];
    let mut seen = 0;
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in methods.as_object().expect("methods") {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] != "query" {
                    continue;
                }
                let name = parameter["name"].as_str().unwrap_or_default();
                let (_, _, value) = expected
                    .iter()
                    .find(|(p, n, _)| p == path && *n == name)
                    .unwrap_or_else(|| {
                        panic!("{method} {path}: unexpected query parameter {name}")
                    });
                let schema = &parameter["schema"];
                assert_eq!(
                    schema["anyOf"],
                    json!([value, empty]),
                    "{method} {path}: {name}"
                );
                let description = schema["description"].as_str().unwrap_or_default();
                assert!(
                    description.contains("empty value counts as absent"),
                    "{method} {path}: {name}: {description}"
                );
                assert_eq!(parameter["required"], false, "{method} {path}: {name}");
                seen += 1;
            }
        }
    }
    assert_eq!(
        seen,
        expected.len(),
        "every listed query parameter is documented"
    );
}

#[test]
fn batch_operations_are_one_closed_schema_per_op() {
    // Goal: BatchOperation is a oneOf of one named, closed object per `op`, told apart by a
    // discriminator on `op` whose mapping names each of them; each requires the fields its
    // single endpoint requires plus account and idempotency_key.
    let doc = document();
    let batch = schema(&doc, "BatchOperation");
    assert_eq!(batch["discriminator"]["propertyName"], "op", "{batch}");
    let mapping = batch["discriminator"]["mapping"]
        .as_object()
        .expect("a discriminator mapping");
    let variants = batch["oneOf"].as_array().expect("a oneOf");
    let mut ops = Vec::new();
    for item in variants {
        let reference = item["$ref"]
            .as_str()
            .expect("each variant is a named schema");
        let name = reference
            .strip_prefix("#/components/schemas/")
            .expect("a component");
        let variant = schema(&doc, name);
        assert_eq!(variant["additionalProperties"], false);
        let op = variant["properties"]["op"]["enum"][0]
            .as_str()
            .expect("one op")
            .to_string();
        let required: BTreeSet<&str> = variant["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for field in ["op", "account", "idempotency_key"] {
            assert!(required.contains(field), "{op}: {field}");
        }
        let properties: BTreeSet<&str> = variant["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
        let own: &[&str] = match op.as_str() {
            "credit" | "debit" => &["amount"],
            "hold" => &["amount", "expires_in_secs"],
            "capture" => &["hold_id", "amount"],
            "release" => &["hold_id"],
            other => panic!("unexpected op {other}"),
        };
        let mut expected: BTreeSet<&str> = ["op", "account", "idempotency_key", "metadata"].into();
        expected.extend(own.iter().copied());
        assert_eq!(properties, expected, "{op}");
        assert_eq!(mapping[&op], reference, "the mapping of {op}");
        ops.push(op);
    }
    assert_eq!(ops, ["credit", "debit", "hold", "capture", "release"]);
    assert_eq!(mapping.len(), ops.len());
}

#[test]
fn the_document_names_its_servers() {
    // Goal: a client generated from the document has a base URL to start from: the server
    // that served it, and the default listen address.
    let doc = document();
    let urls: Vec<&str> = doc["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter_map(|server| server["url"].as_str())
        .collect();
    assert_eq!(urls, ["/", "http://127.0.0.1:8080"]);
}

#[test]
fn every_operation_has_one_declared_tag() {
    // Goal: generated clients group operations by tag; an operation without one (or with
    // an undeclared one) lands in a default group or is dropped. Every declared tag is used.
    let doc = document();
    let declared: BTreeSet<&str> = doc["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|tag| tag["name"].as_str())
        .collect();
    let mut used = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let tags = operation["tags"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} has no tags"));
            assert_eq!(tags.len(), 1, "{method} {path}: {tags:?}");
            let tag = tags[0].as_str().expect("a tag name");
            assert!(
                declared.contains(tag),
                "{method} {path}: tag {tag} is not declared"
            );
            used.insert(tag);
        }
    }
    assert_eq!(used, declared);
}

#[test]
fn problem_codes_are_the_enum_of_every_code_the_server_answers() {
    // Goal: `code` is a closed list, the error table's own, and each endpoint's documented
    // errors use codes of it; the extension members are documented.
    let doc = document();
    let problem = schema(&doc, "Problem");
    let codes: Vec<&str> = problem["properties"]["code"]["enum"]
        .as_array()
        .expect("code is an enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut table: Vec<&str> = Vec::new();
    for kind in coffer::http::error::kinds::ALL {
        if !table.contains(&kind.code) {
            table.push(kind.code);
        }
    }
    assert_eq!(codes, table);
    assert!(codes.contains(&"shutting_down"));
    for member in ["field", "available", "requested", "oldest_cursor"] {
        assert!(
            problem["properties"][member].is_object(),
            "Problem documents {member}"
        );
    }
    for item in doc["paths"].as_object().expect("paths").values() {
        for operation in item.as_object().expect("a path item").values() {
            for response in operation["responses"]
                .as_object()
                .expect("responses")
                .values()
            {
                let examples = &response["content"]["application/problem+json"]["examples"];
                for example in examples.as_object().into_iter().flat_map(|e| e.values()) {
                    let code = example["value"]["code"].as_str().expect("a code");
                    assert!(codes.contains(&code), "{code} is not in the enum");
                }
            }
        }
    }
}

#[test]
fn every_error_kind_is_in_the_table_of_all_kinds() {
    // Goal: a kind added to `error::kinds` without joining `kinds::ALL` would be answered
    // but missing from the document's enum and the README's table.
    let source = include_str!("../src/http/error.rs");
    let names = coffer::http::error::kinds::ALL.len();
    let declared = source
        .lines()
        .filter(|line| {
            line.trim_start().starts_with("pub const ") && line.contains(": ErrorKind =")
        })
        .count();
    assert_eq!(
        declared, names,
        "every `pub const X: ErrorKind` is listed in kinds::ALL"
    );
}

#[test]
fn every_ref_resolves() {
    // Goal: no `$ref` points at nothing.
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(
        !refs.is_empty(),
        "the document uses components through $ref"
    );
    for reference in refs {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        assert!(
            doc.pointer(pointer).is_some(),
            "{reference} does not resolve"
        );
    }
}

#[test]
fn discriminator_mappings_resolve() {
    // Goal: a discriminator's mapping names schemas that exist.
    let doc = document();
    for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
        let Some(mapping) = schema["discriminator"]["mapping"].as_object() else {
            continue;
        };
        for target in mapping.values() {
            let pointer = target.as_str().and_then(|t| t.strip_prefix('#'));
            assert!(
                pointer.is_some_and(|p| doc.pointer(p).is_some()),
                "{name}: {target} does not resolve"
            );
        }
    }
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "$ref" {
                    if let Some(reference) = child.as_str() {
                        out.push(reference.to_string());
                    }
                } else {
                    collect_refs(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|child| collect_refs(child, out)),
        _ => {}
    }
}
