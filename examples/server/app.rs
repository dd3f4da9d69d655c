//! The reference server's routes, generic over where state lives.
//!
//! Everything keygate does is in the [`Gate`] layers and the three library
//! objects (`KeyManager`, `Portal`, `Gate`); the handlers are the thin HTTP
//! glue an API platform writes itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use jiff::Timestamp;
use keygate::auth::{Authenticator, Principal, PrincipalCache, Target};
use keygate::clock::Clock;
use keygate::format::{Environment, NH, NHK, NK, SK, Segment};
use keygate::http::{BodyStyle, Rejection, timestamp_millis};
use keygate::limit::{LimitStore, PlanSet};
use keygate::manager::{CreatedKey, KeyManager, NewKey, TokenExpiry};
use keygate::portal::{self, Portal, PortalStore, SessionRequest};
use keygate::quota::QuotaStore;
use keygate::scope::Scope;
use keygate::store::{KeyStore, ProjectId, RecordId, Tenant, WorkspaceId};
use keygate::tower::Gate;
use serde_json::{Map, Value, json};
use std::pin::Pin;
use zeroize::Zeroizing;

/// Where the server keeps its state: in memory, or in a shared backend.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Key records.
    type Keys: KeyStore + Clone + 'static;
    /// Rate-limit state.
    type Limits: LimitStore + 'static;
    /// Monthly usage.
    type Quotas: QuotaStore + 'static;
    /// Portal sessions.
    type Sessions: PortalStore + 'static;
}

/// The stores of one [`Backend`].
pub(crate) struct Stores<B: Backend> {
    /// Key records.
    pub(crate) keys: B::Keys,
    /// Rate-limit state.
    pub(crate) limits: B::Limits,
    /// Monthly usage.
    pub(crate) quotas: B::Quotas,
    /// Portal sessions.
    pub(crate) sessions: B::Sessions,
}

/// Everything in process memory.
pub(crate) struct Memory;

impl Backend for Memory {
    type Keys = keygate::store::MemoryKeyStore;
    type Limits = keygate::limit::MemoryLimiter;
    type Quotas = keygate::quota::MemoryQuotaStore;
    type Sessions = keygate::portal::MemoryPortalStore;
}

/// Everything in Redis, shared by every instance pointed at it.
pub(crate) struct InRedis;

impl Backend for InRedis {
    type Keys = keygate::redis::RedisKeyStore;
    type Limits = keygate::redis::RedisLimiter;
    type Quotas = keygate::redis::RedisQuotaStore;
    type Sessions = keygate::redis::RedisPortalStore;
}

impl Stores<InRedis> {
    /// The stores of one Redis connection.
    pub(crate) fn redis(redis: &keygate::redis::Redis) -> Self {
        Self {
            keys: redis.keys(),
            limits: redis.limiter(),
            quotas: redis.quota(),
            sessions: redis.portal(),
        }
    }
}

impl Stores<Memory> {
    /// Fresh in-memory stores.
    pub(crate) fn memory() -> Self {
        Self {
            keys: keygate::store::MemoryKeyStore::new(),
            limits: keygate::limit::MemoryLimiter::new(100_000),
            quotas: keygate::quota::MemoryQuotaStore::new(),
            sessions: keygate::portal::MemoryPortalStore::new(),
        }
    }
}

/// What the server is told at start.
pub(crate) struct Config {
    /// The one workspace it serves.
    pub(crate) workspace: WorkspaceId,
    /// Plans keys may name.
    pub(crate) plans: PlanSet,
    /// `http://host:port`, for portal URLs.
    pub(crate) base_url: String,
    /// The verified-principal cache: shared by the authenticator and the
    /// key manager (which drops revoked keys from it at once), and by a
    /// revocation listener when keys live in Redis.
    pub(crate) cache: Arc<PrincipalCache>,
    /// Also serve `POST /load/ingest/{endpoint}`: the ingest handler with
    /// no layer, so a load check can price the layer alone (and
    /// `/load/ingest-with-headers/{endpoint}`, the same with constant
    /// rate-limit headers).
    pub(crate) load_twin: bool,
}

/// The portal session cookie.
pub(crate) const PORTAL_COOKIE: &str = "kg_portal";

struct App<B: Backend> {
    workspace: WorkspaceId,
    manager: KeyManager<B::Keys>,
    gate: Gate<B::Keys, B::Limits, B::Quotas>,
    portal: Portal<B::Sessions, B::Keys>,
    /// Portal endpoints by `{workspace}/{application}` (demo data, not
    /// keygate's).
    endpoints: Mutex<HashMap<String, Vec<Value>>>,
    next_id: AtomicU64,
    /// The portal cookie's `Path`: `/portal` under the public URL's path
    /// (a server mounted under `/base` by a proxy sets `/base/portal`, the
    /// path the browser sees).
    portal_path: String,
    /// The portal page's one script: it drops the spent code from the
    /// page's address, for `portal_path`.
    portal_script: String,
    /// The portal page's Content-Security-Policy: that script (by its
    /// hash) and nothing else, and no framing.
    portal_csp: HeaderValue,
}

type AppState<B> = State<Arc<App<B>>>;

/// Writes out the last-use times still pending (at shutdown).
pub(crate) type Flush = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Request bodies larger than this are refused (a JSON 413) on the routes
/// that read a body; the others never read one.
const MAX_BODY: usize = 64 * 1024;

/// What [`router`] builds: the app, its key manager, and the flush of
/// coalesced last-use times.
pub(crate) type Built<K> = (Router, KeyManager<K>, Flush);

/// The router, the stores' key manager for bootstrapping, and the
/// shutdown flush of last use.
///
/// # Errors
///
/// A scope literal the registry does not know, or a route naming a format
/// or plan the gate lacks (a programming error).
pub(crate) fn router<B: Backend>(
    stores: Stores<B>,
    config: Config,
) -> Result<Built<B::Keys>, Box<dyn std::error::Error>> {
    let Stores { keys, limits, quotas, sessions } = stores;
    let auth = Authenticator::new(keys).formats(portal::formats()).cache(config.cache.clone());
    let gate = Gate::builder(auth.clone(), limits).plans(config.plans).quotas(quotas).build();
    // Built for the authenticator: its store, hasher, formats and clock,
    // and its principal cache, which revocations clear at once.
    let portal = Portal::for_authenticator(sessions, &auth)
        .url_template(format!("{}/portal?code={{code}}", config.base_url));
    // One configuration for the app's manager and the caller's (bootstrap):
    // refusing a key naming a plan the gate lacks (a 400, where the gate
    // would answer each of its requests with a 500).
    let manager = || KeyManager::for_authenticator(&auth).plans(gate.plans());
    let portal_path = portal_path(&config.base_url);
    // The portal's public path (`/base/portal` behind a proxy mounting the
    // server under `/base`), where the cookie is sent: a JSON string, whose
    // `<` the URL's path has already percent-encoded.
    let portal_script =
        format!("history.replaceState(null, \"\", {})", Value::String(portal_path.clone()));
    let app = Arc::new(App::<B> {
        workspace: config.workspace,
        manager: manager(),
        gate: gate.clone(),
        portal,
        endpoints: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        portal_csp: page_csp(&portal_script),
        portal_path,
        portal_script,
    });

    // Keys of formats without a preset plan get the enterprise limits here,
    // so their responses (403s included) carry rate-limit headers too, and a
    // leaked management token cannot mint keys without bound.
    // Each layer is `checked`: a name that resolves to nothing stops the
    // server here, not at the first request.
    let mgmt =
        gate.layer().formats(["nhm"]).plan("enterprise").target(workspace_from_path).checked()?;
    let ingest = gate.layer().formats(["nhk"]).body_style(BodyStyle::Flat).checked()?;
    let svix =
        gate.layer().formats(["sk"]).body_style(BodyStyle::Nested).plan("enterprise").checked()?;
    let hex = gate.layer().formats(["nh"]).body_style(BodyStyle::Envelope).checked()?;
    let ws = app.workspace.clone();
    let seq = gate
        .layer()
        .formats(["nk"])
        .plan("enterprise")
        .target(move |parts| project_from_path(&ws, parts))
        .checked()?;
    let portal_api =
        gate.layer().formats(["kgpt"]).plan("enterprise").cookie(PORTAL_COOKIE).checked()?;

    let keys_path = "/management/v1/workspaces/{ws}/api-keys";
    let tokens = "/management/v1/workspaces/{ws}/tokens";
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            keys_path,
            post(create_key::<B>).route_layer(mgmt.clone().require("api_keys:create")?),
        )
        .route(keys_path, get(list_keys::<B>).route_layer(mgmt.clone().require("api_keys:read")?))
        .route(
            "/management/v1/workspaces/{ws}/api-keys/{id}",
            delete(revoke_key::<B>).route_layer(mgmt.clone().require("api_keys:delete")?),
        )
        .route(tokens, post(create_token::<B>).route_layer(mgmt.clone().require("tokens:create")?))
        .route(tokens, get(list_tokens::<B>).route_layer(mgmt.clone().require("tokens:read")?))
        .route(
            &format!("{tokens}/{{id}}"),
            delete(revoke_token::<B>).route_layer(mgmt.clone().require("tokens:delete")?),
        )
        .route(
            "/management/v1/workspaces/{ws}/applications/{app}/portal",
            post(create_portal::<B>).route_layer(mgmt.require("portal:create")?),
        )
        .route("/api/ingest/{endpoint}", post(ingest_event).route_layer(ingest))
        .route(
            "/v1/applications",
            get(|| async { Json(json!({"data": []})) })
                .route_layer(svix.clone().require("applications:read")?),
        )
        .route(
            "/v1/webhooks",
            post(create_webhook::<B>).route_layer(svix.require("webhooks:write")?),
        )
        .route("/api/v1/ping", get(ping).route_layer(hex.clone()))
        .route("/api/v1/notifications", post(notify::<B>).route_layer(hex))
        .route("/api/v1/seq/{org}/{project}/{flow}/execute", post(execute).route_layer(seq))
        // HEAD (a link checker, `curl -I`) must not spend the link.
        .route("/portal", get(open_portal::<B>).head(portal_head::<B>))
        // Outside the gate, so that its refusals are marked too.
        .route(
            "/portal/api/endpoints",
            get(list_endpoints::<B>)
                .route_layer(portal_api.clone().require("endpoints:read")?)
                .route_layer(map_response(portal_api_headers)),
        )
        .route(
            "/portal/api/endpoints",
            post(create_endpoint::<B>)
                .route_layer(portal_api.clone().require("endpoints:create")?)
                .route_layer(map_response(portal_api_headers)),
        )
        .route(
            "/portal/api/endpoints/{id}",
            delete(delete_endpoint::<B>)
                .route_layer(portal_api.require("endpoints:delete")?)
                .route_layer(map_response(portal_api_headers)),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app.clone());
    let router = if config.load_twin { with_load_twin(router) } else { router };
    // JSON for the refusals axum makes itself, as for every other one
    // (axum still adds `Allow` to the 405).
    let router = router.fallback(not_found).method_not_allowed_fallback(method_not_allowed);
    let flush = flush_last_use(app);
    Ok((router, manager(), flush))
}

impl<B: Backend> App<B> {
    fn reject(&self, rejection: &Rejection, style: BodyStyle) -> Response {
        rejection
            .to_response(style, self.gate.authenticator().clock_ref().now())
            .into_http::<Body>()
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// A JSON response.
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.to_string()).into_response()
    }
}

fn json(status: StatusCode, value: Value) -> Response {
    (status, Json(value)).into_response()
}

/// A request body of at most [`MAX_BODY`] bytes. Over it, a JSON 413 like
/// every other refusal of this server (axum's own is plain text); the
/// layer's rate-limit headers are added on the way out as to any response.
struct BodyBytes(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for BodyBytes {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Self(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                let message = format!("body must be at most {MAX_BODY} bytes");
                let body = json!({"error": {"code": "payload_too_large", "field": "body", "message": message}});
                Err(json(StatusCode::PAYLOAD_TOO_LARGE, body))
            }
            Err(e) => Err(e.into_response()),
        }
    }
}

async fn not_found() -> Response {
    json(StatusCode::NOT_FOUND, json!({"error": {"code": "not_found", "message": "No such route"}}))
}

async fn method_not_allowed() -> Response {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"error": {"code": "method_not_allowed", "message": "Method not allowed on this route"}}),
    )
}

/// The route's path parameters; a path that does not decode (`%FF`) is a
/// JSON 400 like every other refusal of this server (axum's own is plain
/// text).
struct PathParams<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for PathParams<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(e) => Err(bad("path", e.body_text())
                .to_response(BodyStyle::Nested, Timestamp::now())
                .into_http::<Body>()),
        }
    }
}

/// Marks a response that carries a key, token or code as uncacheable.
fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn bad(field: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::BadRequest { field: field.into(), message: message.into() }
}

/// The load check's twins of the ingest route: the handler with no layer,
/// and the same with three rate-limit headers of the gated route's length
/// added as constants: what the headers the issue requires cost on the
/// wire, apart from keygate's work.
fn with_load_twin(router: Router) -> Router {
    router.route("/load/ingest/{endpoint}", post(ingest_event)).route(
        "/load/ingest-with-headers/{endpoint}",
        post(|| async {
            let mut r = ingest_event(None).await;
            let h = r.headers_mut();
            h.insert("x-ratelimit-limit", HeaderValue::from_static("1000000000"));
            h.insert("x-ratelimit-remaining", HeaderValue::from_static("999999999"));
            h.insert("x-ratelimit-reset", HeaderValue::from_static("1764100000"));
            r
        }),
    )
}

/// Last use is coalesced in memory: written out every few seconds for as
/// long as the app lives, and once more by the returned [`Flush`].
fn flush_last_use<B: Backend>(app: Arc<App<B>>) -> Flush {
    let weak = Arc::downgrade(&app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            let _ = app.gate.authenticator().flush_last_use().await;
        }
    });
    Box::new(move || {
        Box::pin(async move {
            let _ = app.gate.authenticator().flush_last_use().await;
        })
    })
}

/// `/management/v1/workspaces/{ws}/…`: the key must reach `{ws}`.
fn workspace_from_path(parts: &axum::http::request::Parts) -> Result<Target, Rejection> {
    let ws = path_segment(parts, 4).ok_or(Rejection::NotFound)?;
    let ws: WorkspaceId = ws.parse().map_err(|_| Rejection::NotFound)?;
    Ok(Target::any().tenant(Tenant::workspace(ws)))
}

/// Path segment `n`, percent-decoded as axum's `Path` decodes it for the
/// handler: the access check and the handler read one value (`proj%5Fx` is
/// `proj_x` to both). `None` when missing or not UTF-8 once decoded.
fn path_segment(parts: &axum::http::request::Parts, n: usize) -> Option<std::borrow::Cow<'_, str>> {
    let raw = parts.uri.path().split('/').nth(n)?;
    // Borrowed unless there was something to decode.
    percent_encoding::percent_decode_str(raw).decode_utf8().ok()
}

/// `/api/v1/seq/{org}/{project}/…`: the key must belong to `{project}`.
fn project_from_path(
    ws: &WorkspaceId,
    parts: &axum::http::request::Parts,
) -> Result<Target, Rejection> {
    // A segment no project can have is a project no key reaches.
    let project = path_segment(parts, 5).ok_or(Rejection::Forbidden { scope: None })?;
    let project: ProjectId = project.parse().map_err(|_| Rejection::Forbidden { scope: None })?;
    Ok(Target::any().tenant(Tenant::workspace(ws.clone()).with_project(project)))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    // A key named twice is refused, not read as its last value.
    match keygate::json::parse(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("body", "body must be a JSON object")),
        Err(keygate::json::JsonError::Duplicate(field)) => {
            Err(bad("body", format!("body names `{field}` twice")))
        }
        Err(e) => Err(bad("body", format!("body is not valid JSON: {e}"))),
    }
}

fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(field, format!("{field} must be a string"))),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, Rejection> {
    opt_str(obj, field)?.ok_or_else(|| bad(field, format!("{field} is required")))
}

fn created_json(created: &CreatedKey) -> Value {
    let r = created.record();
    json!({
        "id": r.id.as_str(),
        "name": r.name,
        "key": created.key().expose_secret(),
        "prefix": r.hint,
        "created_at": timestamp_millis(r.created_at),
        "expires_at": r.expires_at.map(timestamp_millis),
    })
}

// ---- management API -------------------------------------------------------

async fn create_key<B: Backend>(
    State(app): AppState<B>,
    PathParams(ws): PathParams<String>,
    Extension(caller): Extension<Principal>,
    BodyBytes(body): BodyBytes,
) -> Response {
    match new_key(&ws, &body) {
        Err(r) => app.reject(&r, BodyStyle::Nested),
        Ok(new) => match app.manager.create_for(&caller, new).await {
            Ok(created) => no_store(json(StatusCode::CREATED, created_json(&created))),
            Err(e) => app.reject(&e.rejection(), BodyStyle::Nested),
        },
    }
}

/// Every field `POST …/api-keys` reads.
const KEY_FIELDS: &[&str] =
    &["name", "format", "project", "environment", "region", "scopes", "plan", "expiresInDays"];

/// Every field `POST …/tokens` reads.
const TOKEN_FIELDS: &[&str] = &["name", "expiresIn", "scopes"];

/// Refuses a field the route does not read: a typo (`scope`, `expiresIn`
/// on a key) must not mint a key without the scopes or expiry it asked for.
fn known_fields(obj: &Map<String, Value>, fields: &[&str]) -> Result<(), Rejection> {
    match obj.keys().find(|k| !fields.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(Rejection::BadRequest {
            field: k.clone().into(),
            message: format!("{k} is not a known field"),
        }),
    }
}

/// The required `name`: 1 to 100 characters.
fn name_field(obj: &Map<String, Value>) -> Result<&str, Rejection> {
    let name = req_str(obj, "name")?;
    if name.is_empty() || name.chars().count() > 100 {
        return Err(bad("name", "name must be 1 to 100 characters"));
    }
    Ok(name)
}

fn new_key(ws: &str, body: &[u8]) -> Result<NewKey, Rejection> {
    let obj = object(body)?;
    known_fields(&obj, KEY_FIELDS)?;
    let name = name_field(&obj)?;
    let (format, default_plan) = match req_str(&obj, "format")? {
        "nhk" => (NHK, Some("hobby")),
        "nk" => (NK, None),
        "sk" => (SK, None),
        "nh" => (NH, Some("free")),
        _ => return Err(bad("format", "format must be one of nhk, nk, sk, nh")),
    };
    let ws: WorkspaceId = ws.parse().map_err(|_| Rejection::NotFound)?;
    let project = opt_str(&obj, "project")?.unwrap_or("default");
    let project: ProjectId =
        project.parse().map_err(|e| bad("project", format!("project is invalid: {e}")))?;
    let mut new = NewKey::new(name, format, Tenant::workspace(ws).with_project(project));
    // A region only where the key's text carries it (an `sk` key has none).
    // An environment where the key's text carries it (`sk_test_…`,
    // `nk_live_…`: one of the format's), and on ingestion keys, whose
    // record keeps it (seed 000's `staging` keys): the ingestion route
    // answers with it; routing events to that environment's endpoints is
    // the host's part. An `nh` key has no use for one.
    let segment = format.segment();
    if let Some(env) = opt_str(&obj, "environment")? {
        let env: Environment = env.parse().map_err(|e| bad("environment", format!("{e}")))?;
        match segment {
            Segment::Environments(envs) if !envs.contains(&env) => {
                let names: Vec<&str> = envs.iter().map(Environment::as_str).collect();
                let message = format!("{} keys are one of: {}", format.name(), names.join(", "));
                return Err(bad("environment", message));
            }
            Segment::Environments(_) => {}
            _ if format.name() == NHK.name() => {}
            _ => {
                let message = format!("{} keys have no environment", format.name());
                return Err(bad("environment", message));
            }
        }
        new = new.environment(env);
    }
    if let Some(region) = opt_str(&obj, "region")? {
        if segment != Segment::Region {
            return Err(bad("region", format!("{} keys have no region", format.name())));
        }
        let region = region.parse().map_err(|e| bad("region", format!("{e}")))?;
        new = new.region(region);
    }
    if let Some(scopes) = scopes_field(&obj)? {
        new = new.with_scopes(scopes);
    }
    // A plan the gate lacks is the manager's 400 (`KeyManager::plans`).
    if let Some(plan) = opt_str(&obj, "plan")?.or(default_plan) {
        new = new.plan(plan);
    }
    match obj.get("expiresInDays") {
        None | Some(Value::Null) => {}
        Some(v) => {
            // A whole number however it is written (`30`, `30.0`, `3e1`):
            // SDKs that hold numbers as doubles send them so. Judged by the
            // double serde_json read, not by its digits as the library's
            // portal judges `expiresInMinutes`: `30.000000000000001` and
            // `29.9999999999999999` read as 30.0 here, and are 30 days.
            // The range holds for an integer too: multiplied into seconds
            // unchecked, one past 2^64 / 86,400 days wrapped (in release) to
            // a key expiring within the day.
            let days = v.as_u64().or_else(|| v.as_f64().and_then(whole_days));
            let Some(days) = days.filter(|d| (1..=3650).contains(d)) else {
                let message = "expiresInDays must be a whole number of days from 1 to 3650";
                return Err(bad("expiresInDays", message));
            };
            new = new.expires_in(Duration::from_secs(days * 86_400));
        }
    }
    Ok(new)
}

/// `f` as a count of days, if it is a whole number from 1 to 3650.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in range: exact
fn whole_days(f: f64) -> Option<u64> {
    (f.fract() == 0.0 && (1.0..=3650.0).contains(&f)).then_some(f as u64)
}

/// The optional `scopes` field: an array of `resource:action` strings.
fn scopes_field(obj: &serde_json::Map<String, Value>) -> Result<Option<Arc<[Scope]>>, Rejection> {
    match obj.get("scopes") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().and_then(|s| s.parse::<Scope>().ok()))
            .collect::<Option<Arc<[Scope]>>>()
            .map(Some)
            .ok_or_else(|| bad("scopes", "scopes must be resource:action strings")),
        Some(_) => Err(bad("scopes", "scopes must be an array")),
    }
}

/// What a management listing or revocation route addresses: API keys, or
/// management tokens. Portal access tokens are neither (the portal owns
/// them).
#[derive(Clone, Copy)]
enum Kind {
    ApiKeys,
    Tokens,
}

impl Kind {
    fn holds(self, r: &keygate::store::KeyRecord) -> bool {
        match self {
            Self::ApiKeys => r.format != "nhm" && r.format != "kgpt",
            Self::Tokens => r.format == "nhm",
        }
    }
}

async fn list_keys<B: Backend>(
    state: AppState<B>,
    caller: Extension<Principal>,
    ws: PathParams<String>,
) -> Response {
    list::<B>(state, caller, ws, Kind::ApiKeys).await
}

async fn list_tokens<B: Backend>(
    state: AppState<B>,
    caller: Extension<Principal>,
    ws: PathParams<String>,
) -> Response {
    list::<B>(state, caller, ws, Kind::Tokens).await
}

async fn list<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
    PathParams(ws): PathParams<String>,
    kind: Kind,
) -> Response {
    if caller.tenant().workspace.as_str() != ws {
        return app.reject(&Rejection::NotFound, BodyStyle::Nested);
    }
    // Show this instance's latest uses (last use is advisory and batched).
    let _ = app.gate.authenticator().flush_last_use().await;
    match app.manager.list_for(&caller, None).await {
        Err(e) => app.reject(&e.rejection(), BodyStyle::Nested),
        Ok(records) => {
            // The active ones: not revoked, not expired.
            let now = app.gate.authenticator().clock_ref().now();
            let data: Vec<Value> = records
                .iter()
                .filter(|r| r.is_active(now) && kind.holds(r))
                .map(|r| {
                    let mut v = json!({
                        "id": r.id.as_str(),
                        "name": r.name,
                        "prefix": r.hint,
                        "created_at": timestamp_millis(r.created_at),
                        "last_used_at": r.last_used_at.map(timestamp_millis),
                    });
                    if let Kind::Tokens = kind {
                        v["expires_at"] = json!(r.expires_at.map(timestamp_millis));
                    }
                    v
                })
                .collect();
            json(StatusCode::OK, json!({ "data": data }))
        }
    }
}

async fn revoke_key<B: Backend>(
    state: AppState<B>,
    caller: Extension<Principal>,
    path: PathParams<(String, String)>,
) -> Response {
    revoke::<B>(state, caller, path, Kind::ApiKeys).await
}

async fn revoke_token<B: Backend>(
    state: AppState<B>,
    caller: Extension<Principal>,
    path: PathParams<(String, String)>,
) -> Response {
    revoke::<B>(state, caller, path, Kind::Tokens).await
}

async fn revoke<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
    PathParams((ws, id)): PathParams<(String, String)>,
    kind: Kind,
) -> Response {
    let not_found = || app.reject(&Rejection::NotFound, BodyStyle::Nested);
    let Ok(id) = id.parse::<RecordId>() else { return not_found() };
    // Another workspace's key, or a record this route does not address
    // (`api_keys:delete` does not reach management tokens), is not this
    // caller's to see.
    match app.manager.store().get(&id).await {
        Ok(Some(r)) if r.tenant.workspace.as_str() == ws && kind.holds(&r) => {}
        Ok(_) => return not_found(),
        Err(e) => {
            return app
                .reject(&keygate::manager::ManagerError::from(e).rejection(), BodyStyle::Nested);
        }
    }
    // The manager checks again that the caller reaches the record.
    match app.manager.revoke_for(&caller, &id).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => app.reject(&e.rejection(), BodyStyle::Nested),
    }
}

async fn create_token<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
    BodyBytes(body): BodyBytes,
) -> Response {
    let parsed = object(&body).and_then(|obj| {
        known_fields(&obj, TOKEN_FIELDS)?;
        let name = name_field(&obj)?.to_owned();
        let expiry: TokenExpiry =
            req_str(&obj, "expiresIn")?.parse().map_err(|e| bad("expiresIn", format!("{e}")))?;
        Ok((name, expiry, scopes_field(&obj)?))
    });
    let (name, expiry, asked) = match parsed {
        Ok(v) => v,
        Err(r) => return app.reject(&r, BodyStyle::Nested),
    };
    // The scopes asked for, else the caller's; never more than the caller
    // holds (`create_for` refuses that with a 403).
    let scopes = asked.unwrap_or_else(|| {
        app.gate.authenticator().scope_registry().scopes_of(caller.scopes()).into()
    });
    let new = NewKey::new(
        name,
        keygate::format::NHM,
        Tenant::workspace(caller.tenant().workspace.clone()),
    )
    .with_scopes(scopes)
    .token_expiry(expiry);
    match app.manager.create_for(&caller, new).await {
        Ok(created) => {
            let mut v = created_json(&created);
            v["token"] = v["key"].clone();
            no_store(json(StatusCode::CREATED, v))
        }
        Err(e) => app.reject(&e.rejection(), BodyStyle::Nested),
    }
}

async fn create_portal<B: Backend>(
    State(app): AppState<B>,
    PathParams((ws, application)): PathParams<(String, String)>,
    Extension(caller): Extension<Principal>,
    BodyBytes(body): BodyBytes,
) -> Response {
    let request = match SessionRequest::from_json(&body) {
        Ok(r) => r,
        Err(e) => return app.reject(&e.rejection(), BodyStyle::Nested),
    };
    let (Ok(ws), Ok(application)) = (ws.parse(), application.parse()) else {
        return app.reject(&Rejection::NotFound, BodyStyle::Nested);
    };
    match app.portal.create_session(&caller, &ws, &application, request).await {
        Ok(minted) => no_store(json(StatusCode::CREATED, minted.to_json())),
        Err(e) => app.reject(&e.rejection(), BodyStyle::Nested),
    }
}

// ---- product APIs -----------------------------------------------------------

async fn ingest_event(caller: Option<Extension<Principal>>) -> Response {
    // The hot path of an ingestion API: a constant body, unless the key
    // belongs to an environment, which the answer names (the events are
    // that environment's; delivering them is the host's part).
    let environment = caller.as_ref().and_then(|c| c.environment());
    match environment {
        None => (
            StatusCode::ACCEPTED,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"accepted":true}"#,
        )
            .into_response(),
        Some(env) => {
            json(StatusCode::ACCEPTED, json!({"accepted": true, "environment": env.as_str()}))
        }
    }
}

async fn create_webhook<B: Backend>(State(app): AppState<B>) -> Response {
    json(StatusCode::CREATED, json!({"id": app.id("wh")}))
}

async fn ping() -> Response {
    let now = timestamp_millis(Timestamp::now());
    json(StatusCode::OK, json!({"success": true, "data": {"message": "pong"}, "timestamp": now}))
}

async fn notify<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
    BodyBytes(body): BodyBytes,
) -> Response {
    let channel = object(&body).and_then(|obj| match req_str(&obj, "channel")? {
        c @ ("email" | "webhook") => Ok(c.to_owned()),
        _ => Err(bad("channel", "channel must be email or webhook")),
    });
    let channel = match channel {
        Ok(c) => c,
        Err(r) => return app.reject(&r, BodyStyle::Envelope),
    };
    match app.gate.charge(&caller, &channel, 1).await {
        Err(refused) => app.gate.respond(refused.with_style(BodyStyle::Envelope)),
        Ok(charge) => {
            let now = timestamp_millis(Timestamp::now());
            let used = charge.decision().filter(|u| u.rule.is_some()).map(|u| u.used);
            let mut res = json(
                StatusCode::ACCEPTED,
                json!({"success": true, "data": {"id": app.id("ntf"), "channel": channel, "monthlyUsage": used}, "timestamp": now}),
            );
            // A quota outage let through (fail open) reaches the logs as
            // the layer's own do.
            charge.trace_into(res.extensions_mut());
            res
        }
    }
}

async fn execute(
    PathParams((org, project, flow)): PathParams<(String, String, String)>,
    Extension(caller): Extension<Principal>,
) -> Response {
    let environment = caller.environment().map_or_else(|| "live".to_owned(), |e| e.to_string());
    let sandbox = environment == "test";
    json(
        StatusCode::OK,
        json!({"org": org, "project": project, "flow": flow, "environment": environment, "sandbox": sandbox, "status": "completed"}),
    )
}

// ---- portal -----------------------------------------------------------------

/// What a portal page's response always carries: never cached, never sent
/// on as a `Referer` (the URL holds the code), never framed by another page
/// (clickjacking), never sniffed as another type, and `csp` (the page's
/// own script, nothing else).
fn portal_page(mut res: Response, csp: &HeaderValue) -> Response {
    let h = res.headers_mut();
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    no_store(res)
}

/// The portal page's Content-Security-Policy: `script` (the page's one,
/// inline) by its SHA-256 hash, no other script, style, image or
/// connection, no `<base>`, no form, and no framing.
fn page_csp(script: &str) -> HeaderValue {
    use sha2::Digest as _;
    // Standard base64 (RFC 4648, padded), as CSP hash sources are written.
    let hash = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        sha2::Sha256::digest(script.as_bytes()),
    );
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    HeaderValue::from_str(&csp).expect("base64 is a header value")
}

/// What every portal API response carries: the session's data (its
/// endpoints and metadata) answers a cookie, which, unlike
/// `Authorization`, does not keep a shared cache from storing it; and
/// JSON that echoes a caller's text is never to be sniffed as HTML.
async fn portal_api_headers(mut res: Response) -> Response {
    res.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    no_store(res)
}

async fn portal_head<B: Backend>(State(app): AppState<B>) -> Response {
    portal_page(
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")]).into_response(),
        &app.portal_csp,
    )
}

async fn open_portal<B: Backend>(State(app): AppState<B>, RawQuery(query): RawQuery) -> Response {
    let code = match link_code(query.as_deref()) {
        Ok(code) => code,
        Err(r) => return portal_page(app.reject(&r, BodyStyle::Nested), &app.portal_csp),
    };
    match app.portal.redeem(&code).await {
        Err(e) => portal_page(app.reject(&e.rejection(), BodyStyle::Nested), &app.portal_csp),
        Ok(access) => {
            let record = access.record();
            let max_age = record
                .expires_at
                .map_or(0, |t| t.duration_since(Timestamp::now()).as_secs().max(0));
            let cookie = session_cookie(access.token().expose_secret(), &app.portal_path, max_age);
            let application =
                record.tenant.application.as_ref().map_or("", |a| a.as_str()).to_owned();
            let html = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Developer portal</title></head>\
                 <body><h1>Developer portal</h1><p>Application {}</p>\
                 <p>This link has now been used; bookmark nothing but this page's session.</p>\
                 <script>{}</script></body></html>",
                html_escape(&application),
                app.portal_script,
            );
            let mut res =
                (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html)
                    .into_response();
            if let Ok(mut v) = HeaderValue::from_str(&cookie) {
                // Holds the access token: kept out of HTTP/2 header tables.
                v.set_sensitive(true);
                res.headers_mut().insert(header::SET_COOKIE, v);
            }
            portal_page(res, &app.portal_csp)
        }
    }
}

/// The `Set-Cookie` value handing the portal access `token` to the
/// browser, built in one buffer of the exact final size and wiped on drop:
/// `format!` guesses twice its literal text and grows as it writes, so the
/// attributes after the token reallocated it and freed a block still
/// holding a live token, unwiped. (The header value made from it, and the
/// bytes hyper writes, are copies out of the server's reach.)
fn session_cookie(token: &str, path: &str, max_age: i64) -> Zeroizing<String> {
    let max_age = max_age.to_string();
    let parts = [
        PORTAL_COOKIE,
        "=",
        token,
        "; HttpOnly; Secure; SameSite=Strict; Path=",
        path,
        "; Max-Age=",
        &max_age,
    ];
    let mut cookie = Zeroizing::new(String::with_capacity(parts.iter().map(|p| p.len()).sum()));
    for part in parts {
        cookie.push_str(part);
    }
    cookie
}

/// The `code` of a portal link's query (empty when it has none, which
/// redeems as a malformed code). Named twice, the link is refused before
/// either is redeemed: which one counts would depend on the reader (a map
/// keeps the last, a proxy or a log reads the first), so a link with a
/// second code appended must not spend that one silently.
fn link_code(query: Option<&str>) -> Result<String, Rejection> {
    let query = query.unwrap_or_default().as_bytes();
    let mut codes = url::form_urlencoded::parse(query).filter(|(k, _)| k == "code").map(|(_, v)| v);
    let code = codes.next().unwrap_or_default().into_owned();
    if codes.next().is_some() {
        return Err(bad("code", "code appears more than once"));
    }
    Ok(code)
}

fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The caller's workspace and application: the key of its endpoint list
/// (application ids are unique within a workspace only).
fn application_of(caller: &Principal) -> String {
    let t = caller.tenant();
    let app = t.application.as_ref().map_or("", |a| a.as_str());
    format!("{}/{app}", t.workspace)
}

async fn list_endpoints<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
) -> Response {
    let data = app
        .endpoints
        .lock()
        .expect("endpoint list lock")
        .get(&application_of(&caller))
        .cloned()
        .unwrap_or_default();
    json(StatusCode::OK, json!({ "data": data }))
}

/// Bounds on the demo's in-memory endpoint lists.
const MAX_URL_LEN: usize = 2048;
const MAX_ENDPOINTS: usize = 100;
/// Applications holding endpoints: the path names the application, so
/// without this a management token could spread endpoints over any number.
const MAX_APPLICATIONS: usize = 1000;

/// `/portal` under the path of `base_url` (an http(s) URL without a
/// trailing `/`).
fn portal_path(base_url: &str) -> String {
    let path = url::Url::parse(base_url).map(|u| u.path().to_owned()).unwrap_or_default();
    format!("{}/portal", path.trim_end_matches('/'))
}

/// An `http(s)` URL (the scheme in any case, as RFC 3986 has it) with a
/// usable host, as the `url` crate (the WHATWG URL standard) parses it: a
/// domain of letter, digit and `-` labels (none empty or starting or ending
/// with `-`; one trailing `.` allowed), or an IPv4 or IPv6 address; a port,
/// if any, not 0. No `\\` (which the standard reads as `/`), whitespace or
/// control characters anywhere: what a client must send is what it gave.
pub(crate) fn is_http_url(raw: &str) -> bool {
    if raw.bytes().any(|b| b == b'\\' || b.is_ascii_whitespace() || b.is_ascii_control()) {
        return false;
    }
    // The host right after `://`, as written: the standard would read
    // `https:///in` or `https:in` as host `in`.
    if !raw.split_once("://").is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/')) {
        return false;
    }
    let Ok(url) = url::Url::parse(raw) else { return false };
    let label = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let host_ok = match url.host() {
        Some(url::Host::Domain(d)) => d.strip_suffix('.').unwrap_or(d).split('.').all(label),
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => true,
        None => false,
    };
    matches!(url.scheme(), "http" | "https") && host_ok && url.port() != Some(0)
}

/// A cookie-authenticated request that changes state must come from the
/// portal's own pages: `SameSite=Strict` stops other sites, not a sibling
/// subdomain (same site), so the request must also be one no HTML form can
/// send (a JSON body: a cross-origin script needs a CORS preflight, which
/// this server never grants) and, where the browser says, same-origin.
fn same_origin_json(headers: &axum::http::HeaderMap) -> Result<(), Rejection> {
    same_origin(headers)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if json { Ok(()) } else { Err(bad("body", "body must be sent as application/json")) }
}

/// A request the browser says came from the portal's own origin, or from
/// the user directly (`none`); one without `Sec-Fetch-Site` (not a
/// browser's, or an old one) passes. Every state-changing method checks
/// it, `DELETE` as well as `POST`.
fn same_origin(headers: &axum::http::HeaderMap) -> Result<(), Rejection> {
    let site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
    if site.is_some_and(|s| s != b"same-origin" && s != b"none") {
        return Err(Rejection::Forbidden { scope: None });
    }
    Ok(())
}

async fn create_endpoint<B: Backend>(
    State(app): AppState<B>,
    Extension(caller): Extension<Principal>,
    headers: axum::http::HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Response {
    let url = same_origin_json(&headers).and_then(|()| object(&body)).and_then(|obj| {
        known_fields(&obj, &["url"])?;
        let url = req_str(&obj, "url")?;
        if !is_http_url(url) {
            Err(bad("url", "url must be an http(s) URL with a host"))
        } else if url.len() > MAX_URL_LEN {
            Err(bad("url", format!("url must be at most {MAX_URL_LEN} bytes")))
        } else {
            Ok(url.to_owned())
        }
    });
    let url = match url {
        Ok(u) => u,
        Err(r) => return app.reject(&r, BodyStyle::Nested),
    };
    let endpoint = json!({
        "id": app.id("ep"),
        "url": url,
        // The session's metadata, not the library's `portal.` keys.
        "metadata": caller.session_metadata().collect::<BTreeMap<_, _>>(),
        "created_by": caller.hint(),
    });
    {
        let mut endpoints = app.endpoints.lock().expect("endpoint list lock");
        let application = application_of(&caller);
        // Bounded: sessions cannot grow the demo's memory at will.
        if endpoints.len() >= MAX_APPLICATIONS && !endpoints.contains_key(&application) {
            let message = format!("at most {MAX_APPLICATIONS} applications hold endpoints");
            return app.reject(&Rejection::Conflict { message }, BodyStyle::Nested);
        }
        let list = endpoints.entry(application).or_default();
        if list.len() >= MAX_ENDPOINTS {
            let message = format!("an application has at most {MAX_ENDPOINTS} endpoints");
            return app.reject(&Rejection::Conflict { message }, BodyStyle::Nested);
        }
        list.push(endpoint.clone());
    }
    json(StatusCode::CREATED, endpoint)
}

async fn delete_endpoint<B: Backend>(
    State(app): AppState<B>,
    PathParams(id): PathParams<String>,
    Extension(caller): Extension<Principal>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(r) = same_origin(&headers) {
        return app.reject(&r, BodyStyle::Nested);
    }
    let mut all = app.endpoints.lock().expect("endpoint list lock");
    let application = application_of(&caller);
    let Some(list) = all.get_mut(&application) else {
        drop(all);
        return app.reject(&Rejection::NotFound, BodyStyle::Nested);
    };
    let before = list.len();
    list.retain(|e| e["id"] != id.as_str());
    if list.len() == before {
        drop(all);
        return app.reject(&Rejection::NotFound, BodyStyle::Nested);
    }
    if list.is_empty() {
        all.remove(&application);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Creates the bootstrap management token (all scopes, never expires).
///
/// # Errors
///
/// The store failed.
pub(crate) async fn bootstrap<K: KeyStore>(
    manager: &KeyManager<K>,
    workspace: WorkspaceId,
) -> Result<CreatedKey, keygate::manager::ManagerError> {
    let all: Scope = "*".parse().map_err(keygate::manager::ManagerError::Scope)?;
    manager.create_management_token(workspace, "bootstrap", TokenExpiry::Never, vec![all]).await
}

#[cfg(test)]
mod tests {
    use super::{PORTAL_COOKIE, is_http_url, session_cookie};

    #[test]
    fn the_session_cookie_is_built_in_one_exact_buffer() {
        // Exactly full: no reallocation freed a block still holding the
        // token (the attributes after it made `format!` grow its buffer).
        let token = keygate::portal::ACCESS_TOKEN.mint_default().unwrap();
        let token = token.expose_secret();
        for (path, max_age) in [("/portal", 3600), ("/base/portal", 0), ("/p", 59)] {
            let cookie = session_cookie(token, path, max_age);
            assert_eq!(
                *cookie,
                format!(
                    "{PORTAL_COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path={path}; \
                     Max-Age={max_age}"
                )
            );
            assert_eq!(cookie.capacity(), cookie.len(), "{path} {max_age}");
        }
    }

    #[test]
    fn an_http_url_has_a_usable_host() {
        let good = [
            "https://h.test",
            "HTTP://h.test:8080/in?x=1",
            "https://u@h.test/",
            "http://[::1]/",
            "http://[::1]:80",
            "https://H.TEST./",
            "https://xn--bcher-kva.test/",
            "http://h.test:65535",
            "http://192.0.2.1/",
        ];
        for url in good {
            assert!(is_http_url(url), "{url}");
        }
        let bad = [
            "https://",
            "https:///in",
            "https:in",
            "https://user@/in",
            "http://:80",
            "http://\\",
            "http://\\@h.test",
            "http:// ",
            "http://[",
            "https://a b/",
            "http://[::1]80",
            "http://h.test:123456",
            "http://h.test:65536/",
            "http://h.test:0/",
            "http://[:]/",
            "http://[1]/",
            "http://[1.2.3.4]/",
            "http://999.1.1.1/",
            "http://./",
            "http://../",
            "http://-/",
            "http://a..b/",
            "http://-a.test/",
            "ftp://h.test",
            "h.test",
        ];
        for url in bad {
            assert!(!is_http_url(url), "{url}");
        }
    }
}
