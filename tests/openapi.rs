//! The OpenAPI document served at `GET /openapi.json` is the one in `src/http/openapi.json`
//! (included with `include_str!`). These tests keep it honest: it is OpenAPI 3.1, it names
//! every route of `http::router()` with its methods and nothing the router does not serve,
//! and every `$ref` in it resolves.

use serde_json::Value;

const DOCUMENT: &str = include_str!("../src/http/openapi.json");

/// Every route of `coffer::http::router()`, with the methods it serves. Keep this table in
/// step with the router: a route added there and not here (or not in the document) fails.
const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/accounts/{id}", &["put", "get"]),
    ("/v1/accounts/{id}/credits", &["post"]),
    ("/v1/accounts/{id}/debits", &["post"]),
    ("/v1/accounts/{id}/holds", &["post", "get"]),
    ("/v1/accounts/{id}/holds/{hold_id}", &["get"]),
    ("/v1/accounts/{id}/holds/{hold_id}/capture", &["post"]),
    ("/v1/accounts/{id}/holds/{hold_id}/release", &["post"]),
    ("/v1/accounts/{id}/transactions", &["get"]),
    ("/v1/batch", &["post"]),
    ("/v1/events", &["get"]),
    ("/v1/transfers", &["post"]),
    ("/v1/transfers/{id}", &["get"]),
    ("/v1/accounts/{id}/idempotency-keys/{key}", &["get"]),
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
];

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
    serde_json::from_str(DOCUMENT).expect("src/http/openapi.json is valid JSON")
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
fn every_route_and_method_of_the_router_is_documented_and_nothing_else() {
    // Goal: the document describes exactly the routes the router serves.
    let doc = document();
    let paths = doc["paths"].as_object().expect("a paths object");
    for (path, methods) in ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is missing from the document"));
        for method in *methods {
            assert!(
                item.get(*method).is_some_and(Value::is_object),
                "{} {path} is missing from the document",
                method.to_uppercase()
            );
        }
        for method in HTTP_METHODS {
            if item.get(*method).is_some() {
                assert!(
                    methods.contains(method),
                    "{} {path} is documented but not routed",
                    method.to_uppercase()
                );
            }
        }
    }
    for path in paths.keys() {
        assert!(
            ROUTES.iter().any(|(routed, _)| routed == path),
            "{path} is documented but not routed"
        );
    }
}

#[test]
fn every_operation_documents_its_path_parameters_and_errors_as_problems() {
    // Goal: each `{param}` of a path is declared, and every error status answers problem+json.
    let doc = document();
    for (path, methods) in ROUTES {
        let item = &doc["paths"][*path];
        for method in *methods {
            let operation = &item[*method];
            let mut declared: Vec<String> = Vec::new();
            for list in [&item["parameters"], &operation["parameters"]] {
                for parameter in list.as_array().into_iter().flatten() {
                    let parameter = resolve_local(&doc, parameter);
                    if parameter["in"] == "path" {
                        let name = parameter["name"].as_str().expect("a parameter name");
                        declared.push(format!("{{{name}}}"));
                    }
                }
            }
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                assert!(
                    declared.iter().any(|d| d == segment),
                    "{} {path}: path parameter {segment} is not declared",
                    method.to_uppercase()
                );
            }
            let responses = operation["responses"]
                .as_object()
                .expect("a responses object");
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{} {path}: no success response",
                method.to_uppercase()
            );
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let response = resolve_local(&doc, response);
                    assert!(
                        response["content"]["application/problem+json"].is_object(),
                        "{} {path}: {status} is not application/problem+json",
                        method.to_uppercase()
                    );
                }
            }
        }
    }
}

#[test]
fn money_moving_posts_require_an_idempotency_key() {
    // Goal: the contract's rule "every POST that moves money needs a key" is in the document.
    let doc = document();
    for path in MONEY_MOVING {
        let operation = &doc["paths"][*path]["post"];
        let required_key = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| resolve_local(&doc, p))
            .any(|p| {
                p["in"] == "header" && p["name"] == "Idempotency-Key" && p["required"] == true
            });
        assert!(required_key, "POST {path}: no required Idempotency-Key");
        let success = operation["responses"]
            .as_object()
            .expect("responses")
            .iter()
            .find(|(status, _)| status.starts_with('2'))
            .map(|(_, r)| resolve_local(&doc, r))
            .expect("a success response");
        assert!(
            success["headers"]["Idempotent-Replayed"].is_object(),
            "POST {path}: the success response does not document Idempotent-Replayed"
        );
    }
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

/// Follows a local `$ref` (also chains of them); other values are returned as they are.
fn resolve_local<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    let mut value = value;
    for _ in 0..16 {
        let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
            return value;
        };
        let pointer = reference.strip_prefix('#').expect("a local reference");
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{reference} does not resolve"));
    }
    panic!("a $ref chain longer than 16");
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
