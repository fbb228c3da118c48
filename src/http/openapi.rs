//! The OpenAPI 3.1 document of `GET /openapi.json`, generated from the code.
//!
//! Each handler carries its `#[utoipa::path]` (path, method, parameters, bodies, answers), and
//! [`Routes`] is the only way the router gets a route: it takes the handler together with its
//! documentation and registers both, so a route cannot be served undocumented or documented
//! unserved. Error answers come from the same [`ErrorKind`] table the server answers with;
//! schemas come from the request and response types themselves (`dto`, `schema`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use serde_json::json;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::HttpMethod;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::server::ServerBuilder;
use utoipa::openapi::{
    ComponentsBuilder, InfoBuilder, LicenseBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr,
    Response, Tag,
};
use utoipa::ToSchema;

use super::error::{ErrorKind, ProblemJson};
use super::{dto, schema, AppState};

/// A route and its documentation, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDoc {
    /// The path template, e.g. `/v1/accounts/{id}`.
    pub path: String,
    /// The methods, lower case.
    pub methods: Vec<String>,
}

/// Builds the router and the document's paths together.
pub(crate) struct Routes {
    router: Router<AppState>,
    paths: Paths,
    table: Vec<RouteDoc>,
}

impl Routes {
    pub(crate) fn new() -> Routes {
        Routes {
            router: Router::new(),
            paths: Paths::new(),
            table: Vec::new(),
        }
    }

    /// Serves `handler` at the path and methods its `#[utoipa::path]` (`P`) names, and
    /// documents it with that operation.
    pub(crate) fn add<P, H, T>(mut self, handler: H) -> Routes
    where
        P: utoipa::Path + for<'t> utoipa::__dev::Tags<'t>,
        H: Handler<T, AppState>,
        T: 'static,
    {
        let path = P::path();
        let methods = P::methods();
        let mut route = MethodRouter::new();
        for method in &methods {
            route = route.on(method_filter(method), handler.clone());
        }
        self.router = self.router.route(&path, route);
        self.table.push(RouteDoc {
            path: path.clone(),
            methods: methods.iter().map(method_name).collect(),
        });
        // utoipa puts a path's `tag` into its operation only when its `OpenApi` derive
        // collects the paths; this document is built here, so the tags are added here.
        let mut operation = P::operation();
        let tags = operation.tags.get_or_insert_with(Vec::new);
        tags.extend(P::tags().into_iter().map(str::to_string));
        self.paths.add_path_operation(&path, methods, operation);
        self
    }

    /// The router of every added route.
    pub(crate) fn into_router(self) -> Router<AppState> {
        self.router
    }

    /// What was added.
    pub(crate) fn table(&self) -> &[RouteDoc] {
        &self.table
    }

    /// The OpenAPI document of every added route.
    pub(crate) fn document(self) -> OpenApi {
        document(self.paths)
    }
}

fn method_filter(method: &HttpMethod) -> MethodFilter {
    match method {
        HttpMethod::Get => MethodFilter::GET,
        HttpMethod::Put => MethodFilter::PUT,
        HttpMethod::Post => MethodFilter::POST,
        HttpMethod::Delete => MethodFilter::DELETE,
        HttpMethod::Options => MethodFilter::OPTIONS,
        HttpMethod::Head => MethodFilter::HEAD,
        HttpMethod::Patch => MethodFilter::PATCH,
        HttpMethod::Trace => MethodFilter::TRACE,
    }
}

fn method_name(method: &HttpMethod) -> String {
    match method {
        HttpMethod::Get => "get",
        HttpMethod::Put => "put",
        HttpMethod::Post => "post",
        HttpMethod::Delete => "delete",
        HttpMethod::Options => "options",
        HttpMethod::Head => "head",
        HttpMethod::Patch => "patch",
        HttpMethod::Trace => "trace",
    }
    .to_string()
}

/// The document as served, made once.
pub(crate) fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let document = super::routes(true).document();
        // Serializing plain maps, strings and numbers cannot fail.
        serde_json::to_string(&document).expect("the OpenAPI document serializes")
    })
}

/// The tags of the document's operations (each operation has exactly one), with their
/// descriptions. Generated clients group operations by them.
pub const TAGS: [(&str, &str); 8] = [
    ("accounts", "Opening and reading accounts."),
    (
        "transactions",
        "Credits and debits, and an account's history of transactions.",
    ),
    ("holds", "Reserving money, then capturing or releasing it."),
    (
        "transfers",
        "Moving money between two accounts, all or nothing, exactly once.",
    ),
    (
        "batch",
        "Many credits, debits and hold operations in one request.",
    ),
    (
        "idempotency",
        "What a request with an idempotency key was answered.",
    ),
    (
        "events",
        "Every committed transaction of every account, in commit order.",
    ),
    ("service", "Health, readiness, metrics and this document."),
];

const DESCRIPTION: &str = "Accounts, credits, debits, holds (capture, release, expiry) and transfers with idempotent retries. Amounts are integers in the account's minor unit. A 2xx answer to a change means it is written and fdatasync'ed to the write-ahead log; no answer shows state a crash could undo.\n\nEvery error is `application/problem+json` with a stable `code`. Request bodies are limited to 65,536 bytes (1 MiB for `/v1/batch`; 413 payload_too_large). Unknown fields, explicit nulls, and numbers with a fractional part are 400 invalid_request; a number whose exact value is an integer is that integer however it is written (`46`, `46.0`, `4.6e1`), read from its text and never through a float. Well-formed values out of bounds are 422 validation_failed. A query parameter given with an empty value (`?limit=&after=`, as in the contract's URL template `?status=open&limit=&after=`) counts as absent, the same as leaving it out; a non-empty malformed value (`limit=0`, `status=foo`) is 400 invalid_request. Until recovery is done every `/v1` endpoint answers 503 not_ready. A path that names no endpoint is 404 `not_found`; a known path with another method is 405 `method_not_allowed` with `Allow`.\n\nWhen bearer tokens are configured every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer TOKEN` (401 unauthorized first, before any other error). Every answer carries `X-Request-Id` (the client's if it sent a sane one, else a new UUID v7). Per-token rate limits answer 429 rate_limited with Retry-After; a request over the request timeout, or one whose account's mailbox stays full, answers 503 overloaded with Retry-After.";

fn document(paths: Paths) -> OpenApi {
    let mut components = ComponentsBuilder::new().security_scheme(
        "bearerAuth",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "When tokens are configured (--auth-tokens-file, COFFER_AUTH_TOKENS), every endpoint but /healthz and /readyz needs `Authorization: Bearer TOKEN`; /metrics too unless it is served on its own --metrics-listen address.",
                ))
                .build(),
        ),
    );
    for (name, schema) in component_schemas() {
        components = components.schema(name, schema);
    }
    let info = InfoBuilder::new()
        .title("coffer")
        .version("1")
        .description(Some(DESCRIPTION))
        .license(Some(
            LicenseBuilder::new()
                .name("Apache-2.0")
                .identifier(Some("Apache-2.0"))
                .build(),
        ))
        .build();
    let tag = |name: &str, description: &str| {
        let mut tag = Tag::new(name);
        tag.description = Some(description.to_string());
        tag
    };
    OpenApiBuilder::new()
        .info(info)
        .servers(Some([
            ServerBuilder::new()
                .url("/")
                .description(Some("The server that served this document."))
                .build(),
            ServerBuilder::new()
                .url("http://127.0.0.1:8080")
                .description(Some("`coffer serve` with its default --listen."))
                .build(),
        ]))
        .paths(paths)
        .components(Some(components.build()))
        .security(Some([SecurityRequirement::new(
            "bearerAuth",
            Vec::<String>::new(),
        )]))
        .tags(Some(TAGS.map(|(name, description)| tag(name, description))))
        .build()
}

/// Every named schema the paths refer to, with the schemas they refer to in turn.
fn component_schemas() -> Vec<(String, RefOr<Schema>)> {
    let mut out = Vec::new();
    fn add<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) {
        out.push((T::name().into_owned(), T::schema()));
        T::schemas(out);
    }
    add::<schema::AccountIdSchema>(&mut out);
    add::<schema::CurrencySchema>(&mut out);
    add::<schema::MetadataSchema>(&mut out);
    add::<ProblemJson>(&mut out);
    add::<dto::AccountJson>(&mut out);
    add::<dto::TransactionJson>(&mut out);
    add::<dto::HoldJson>(&mut out);
    add::<dto::ReceiptJson>(&mut out);
    add::<dto::HoldReceiptDoc>(&mut out);
    add::<dto::HoldPage>(&mut out);
    add::<dto::TransactionPage>(&mut out);
    add::<dto::IdempotencyLookup>(&mut out);
    add::<dto::TransferJson>(&mut out);
    add::<dto::TransferReceiptJson>(&mut out);
    add::<dto::AccountBody>(&mut out);
    add::<dto::MoveBody>(&mut out);
    add::<dto::HoldBody>(&mut out);
    add::<dto::CaptureBody>(&mut out);
    add::<dto::ReleaseBody>(&mut out);
    add::<dto::TransferBody>(&mut out);
    add::<dto::BatchBody>(&mut out);
    add::<schema::BatchOperation>(&mut out);
    add::<dto::BatchResultDoc>(&mut out);
    add::<dto::BatchResponseDoc>(&mut out);
    add::<dto::Health>(&mut out);
    add::<dto::Readiness>(&mut out);
    add::<dto::EventJson>(&mut out);
    add::<super::events::PageJson>(&mut out);
    // One entry per name (a schema reached twice is the same schema).
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|(name, _)| seen.insert(name.clone()));
    out
}

/// The error answers of an endpoint: one response per status, `application/problem+json`,
/// describing and exemplifying every kind of that status. `Retry-After` and
/// `WWW-Authenticate` are documented where a kind sends them.
pub(crate) fn problem_responses(kinds: &[ErrorKind]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorKind>> = BTreeMap::new();
    for kind in kinds {
        let list = by_status.entry(kind.status.as_u16()).or_default();
        if !list.contains(kind) {
            list.push(*kind);
        }
    }
    by_status
        .into_iter()
        .map(|(status, kinds)| (status.to_string(), RefOr::T(problem_response(&kinds))))
        .collect()
}

fn problem_response(kinds: &[ErrorKind]) -> Response {
    let description = kinds
        .iter()
        .map(|kind| kind.meaning)
        .collect::<Vec<_>>()
        .join(". ");
    let mut content =
        ContentBuilder::new().schema(Some(Ref::from_schema_name(ProblemJson::name())));
    for kind in kinds {
        let mut example = json!({
            "type": format!("urn:coffer:error:{}", kind.code),
            "title": kind.title,
            "status": kind.status.as_u16(),
            "detail": kind.example_detail,
            "code": kind.code,
        });
        if kind == &crate::http::error::kinds::CURSOR_EXPIRED {
            example["oldest_cursor"] = json!("e00000000000003e8");
        }
        content = content.examples_from_iter([(
            kind.code,
            ExampleBuilder::new().value(Some(example)).build(),
        )]);
    }
    let mut response = ResponseBuilder::new()
        .description(format!("{description}."))
        .content("application/problem+json", content.build());
    if kinds
        .iter()
        .any(|kind| kind.retry_after_secs.is_some() || kind.code == "rate_limited")
    {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                )
                .description(Some(
                    "Seconds to wait before retrying; sent with not_ready, overloaded and rate_limited.",
                ))
                .build(),
        );
    }
    if kinds.iter().any(|kind| kind.code == "unauthorized") {
        response = response.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some("`Bearer realm=\"coffer\"`."))
                .build(),
        );
    }
    response.build()
}

/// Declares a type whose `IntoResponses` are the problem answers of the given kinds, for a
/// handler's `#[utoipa::path(responses(...))]`.
macro_rules! problems {
    ($(#[$meta:meta])* $name:ident = [$($kind:ident),+ $(,)?]) => {
        $(#[$meta])*
        pub(crate) struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                $crate::http::openapi::problem_responses(&[
                    $($crate::http::error::kinds::$kind),+
                ])
            }
        }
    };
}
pub(crate) use problems;
