//! Rejections as HTTP data: status, headers and a JSON body in the style the
//! host picks. Framework-agnostic; no HTTP crate needed.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};

/// The JSON shape of error bodies. The seed products use the first three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BodyStyle {
    /// `{"error": "Rate limit exceeded", "limit": 50, "retryAfter": 1}` —
    /// a flat `error` string plus fields.
    Flat,
    /// `{"success": false, "error": "Invalid API key", "timestamp": "2026-01-09T12:00:00.000Z"}`.
    Envelope,
    /// `{"error": {"code": "unauthorized", "message": "Invalid or missing API key"}}`.
    #[default]
    Nested,
    /// RFC 9457 `application/problem+json`.
    Problem,
}

/// How a route takes credentials, for the `WWW-Authenticate` challenge of
/// its 401s (and scope 403s): RFC 7235 asks for a challenge that applies to
/// the resource, and a route that takes keys only in `X-API-Key` refuses
/// a Bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AuthScheme {
    /// RFC 6750 Bearer tokens (`Authorization: Bearer …`).
    #[default]
    Bearer,
    /// A key in the `X-API-Key` header: `ApiKey header="X-API-Key"`, with
    /// RFC 6750's error and scope parameters.
    ApiKeyHeader,
}

impl AuthScheme {
    /// The challenge's scheme and its own parameters.
    const fn head(self) -> &'static str {
        match self {
            Self::Bearer => "Bearer",
            Self::ApiKeyHeader => "ApiKey header=\"X-API-Key\"",
        }
    }

    /// Separates the scheme's head from the first error parameter.
    const fn sep(self) -> &'static str {
        match self {
            Self::Bearer => " ",
            Self::ApiKeyHeader => ", ",
        }
    }
}

/// Why a request is refused, as the caller will see it.
///
/// Deliberately coarse: a missing key and an invalid key are distinguished
/// (the seeds do), but an unknown, revoked, expired or wrong-secret key are all
/// [`Rejection::InvalidCredentials`]. The typed reason for logs lives in the
/// error that produced the rejection, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// 401: no credential was presented (nor any key: an `Authorization`
    /// header of a scheme other than Bearer is answered so too).
    MissingCredentials,
    /// 401: the credential is malformed, unknown, revoked or expired, holds
    /// the wrong secret, is of a format the route does not take or of
    /// another region, or came in a way the header rules refuse.
    InvalidCredentials,
    /// 403: the key is valid but may not reach this resource (scope, tenant,
    /// environment). `scope` names the missing scope when there is one.
    Forbidden {
        /// The scope the request needed, for `WWW-Authenticate: … scope=`.
        scope: Option<String>,
    },
    /// 403: the account behind the key is inactive or deleted.
    AccountInactive,
    /// 400: the request body or parameters break a rule.
    BadRequest {
        /// The offending field, e.g. `expiresInMinutes`.
        field: Cow<'static, str>,
        /// What is wrong, e.g. `expiresInMinutes must be between 1 and 60`.
        message: String,
    },
    /// 404: the resource does not exist, or is not the caller's to see.
    NotFound,
    /// 409: the request conflicts with current state (e.g. the key limit of
    /// a project is reached).
    Conflict {
        /// What conflicts.
        message: String,
    },
    /// 410: a single-use resource (a portal link) was already used.
    Gone,
    /// 410: a single-use link is not one (malformed, unknown) or has
    /// expired: one answer for all three, in a link's words rather than an
    /// API key's.
    InvalidLink,
    /// 429: a rate limit denied the request.
    RateLimited {
        /// The limit of the policy that denied, for the body's `limit`.
        limit: u64,
        /// How long until a retry can succeed.
        retry_after: Duration,
    },
    /// 429: the request costs more than a rate limit ever allows at once
    /// (its burst): no wait helps, so there is no `Retry-After`.
    CostExceedsLimit {
        /// The limit of the policy the cost exceeds, for the body's `limit`.
        limit: u64,
    },
    /// 429: the request costs more than a monthly quota allows in a whole
    /// month: no reset helps, so there is no `Retry-After`.
    CostExceedsQuota {
        /// The monthly limit the cost exceeds, for the body's `limit`.
        limit: u64,
    },
    /// 429: a monthly quota is used up.
    QuotaExceeded {
        /// Units used this month.
        used: u64,
        /// The month's limit.
        limit: u64,
        /// When the quota resets (the next 1st, 00:00 UTC).
        resets_at: Timestamp,
    },
    /// 503: a backend store failed and the host chose to fail closed, the
    /// OS random generator failed, or a generated id collided: a retry may
    /// succeed.
    Unavailable,
    /// 500: the deployment is misconfigured (a key names a plan the gate
    /// does not have; a key's scopes do not compile under the registry; a
    /// record names a format the manager does not know).
    /// No `Retry-After`: retrying does not help.
    Misconfigured,
}

/// An HTTP response as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, in order. Names are lowercase-insensitive as in HTTP;
    /// keygate writes them in their conventional casing.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Whole seconds in `d`, rounded up: a 100 ms wait is `1`, never `0`.
#[must_use]
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// RFC 3339 UTC with milliseconds, as the seeds write timestamps:
/// `2026-01-09T12:00:00.000Z`.
#[must_use]
pub fn timestamp_millis(t: Timestamp) -> String {
    // Truncate to whole milliseconds (toward the past, also before 1970),
    // then always print three digits.
    let ms = i64::try_from(t.as_nanosecond().div_euclid(1_000_000)).unwrap_or(0);
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let whole = Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH);
    let s = whole.to_string(); // `YYYY-MM-DDTHH:MM:SSZ`
    format!("{}.{frac:03}Z", s.trim_end_matches('Z'))
}

impl Rejection {
    /// The HTTP status code.
    #[must_use]
    pub const fn status(&self) -> u16 {
        match self {
            Self::MissingCredentials | Self::InvalidCredentials => 401,
            Self::Forbidden { .. } | Self::AccountInactive => 403,
            Self::BadRequest { .. } => 400,
            Self::NotFound => 404,
            Self::Conflict { .. } => 409,
            Self::Gone | Self::InvalidLink => 410,
            Self::RateLimited { .. }
            | Self::CostExceedsLimit { .. }
            | Self::CostExceedsQuota { .. }
            | Self::QuotaExceeded { .. } => 429,
            Self::Unavailable => 503,
            Self::Misconfigured => 500,
        }
    }

    /// The human message in the flat and envelope styles (the seeds' words).
    #[must_use]
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Self::MissingCredentials => "API key is missing".into(),
            Self::InvalidCredentials => "Invalid API key".into(),
            Self::Forbidden { .. } => "API key does not have access to this resource".into(),
            Self::AccountInactive => "Account is inactive".into(),
            Self::BadRequest { message, .. } | Self::Conflict { message } => message.clone().into(),
            Self::NotFound => "Not found".into(),
            Self::Gone => "This link has already been used".into(),
            Self::InvalidLink => "This link is invalid or has expired".into(),
            Self::RateLimited { .. } => "Rate limit exceeded".into(),
            Self::CostExceedsLimit { .. } => "Request cost exceeds the rate limit".into(),
            Self::CostExceedsQuota { limit } => {
                format!("Request cost exceeds the monthly usage limit ({limit}).").into()
            }
            Self::QuotaExceeded { used, limit, resets_at } => {
                let d = jiff::tz::Offset::UTC.to_datetime(*resets_at).date();
                format!(
                    "Monthly usage limit exceeded ({used}/{limit}). Upgrade your plan or wait for reset on {}/{}/{}.",
                    d.month(),
                    d.day(),
                    d.year()
                )
                .into()
            }
            Self::Unavailable => "Service temporarily unavailable".into(),
            Self::Misconfigured => "Internal server error".into(),
        }
    }

    /// The machine code in the nested and problem styles.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Self::MissingCredentials | Self::InvalidCredentials => "unauthorized",
            Self::Forbidden { .. } | Self::AccountInactive => "forbidden",
            Self::BadRequest { .. } => "invalid_request",
            Self::NotFound => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Gone | Self::InvalidLink => "gone",
            Self::RateLimited { .. } | Self::CostExceedsLimit { .. } => "rate_limit_exceeded",
            Self::QuotaExceeded { .. } | Self::CostExceedsQuota { .. } => "quota_exceeded",
            Self::Unavailable => "unavailable",
            Self::Misconfigured => "internal_error",
        }
    }

    /// Seconds until a retry can succeed, for `Retry-After` (rounded up).
    #[must_use]
    pub fn retry_after_secs(&self, now: Timestamp) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(ceil_secs(*retry_after).max(1)),
            Self::QuotaExceeded { resets_at, .. } => {
                let ms = resets_at.as_millisecond().saturating_sub(now.as_millisecond());
                let ms = u64::try_from(ms).unwrap_or(0);
                Some(ceil_secs(Duration::from_millis(ms)).max(1))
            }
            Self::Unavailable => Some(1),
            _ => None,
        }
    }

    /// The RFC 6750 `WWW-Authenticate` value for 401 and scope-related 403s.
    #[must_use]
    pub fn www_authenticate(&self) -> Option<String> {
        self.challenge(AuthScheme::Bearer)
    }

    /// The `WWW-Authenticate` value for 401 and scope-related 403s, in
    /// `scheme`.
    #[must_use]
    pub fn challenge(&self, scheme: AuthScheme) -> Option<String> {
        let (head, sep) = (scheme.head(), scheme.sep());
        match self {
            // No error code when credentials are missing (RFC 6750 §3.1).
            Self::MissingCredentials => Some(head.to_owned()),
            Self::InvalidCredentials => Some(format!("{head}{sep}error=\"invalid_token\"")),
            // RFC 6750's scope syntax (printable ASCII but `"` and `\`); a
            // host-built scope outside it is left out, never spliced in.
            // `scope = scope-token *( SP scope-token )`, each token
            // non-empty.
            Self::Forbidden { scope: Some(s) }
                if s.split(' ').all(|t| {
                    !t.is_empty()
                        && t.bytes().all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
                }) =>
            {
                Some(format!("{head}{sep}error=\"insufficient_scope\", scope=\"{s}\""))
            }
            Self::Forbidden { .. } => Some(format!("{head}{sep}error=\"insufficient_scope\"")),
            _ => None,
        }
    }

    /// The full response in `style`, stamped with `now` where the style has a
    /// timestamp.
    #[must_use]
    pub fn to_response(&self, style: BodyStyle, now: Timestamp) -> Response {
        self.to_response_in(style, AuthScheme::Bearer, now)
    }

    /// [`to_response`](Self::to_response) with the `WWW-Authenticate`
    /// challenge in `scheme`.
    #[must_use]
    pub fn to_response_in(&self, style: BodyStyle, scheme: AuthScheme, now: Timestamp) -> Response {
        let status = self.status();
        let mut headers = Vec::with_capacity(3);
        let content_type = if style == BodyStyle::Problem {
            "application/problem+json"
        } else {
            "application/json"
        };
        headers.push(("Content-Type", content_type.to_owned()));
        if let Some(v) = self.challenge(scheme) {
            headers.push(("WWW-Authenticate", v));
        }
        let retry = self.retry_after_secs(now);
        if let Some(s) = retry {
            headers.push(("Retry-After", s.to_string()));
        }
        let message = self.message();
        let body = match style {
            BodyStyle::Flat => {
                let mut v = json!({ "error": message });
                match self {
                    Self::RateLimited { limit, .. } => {
                        v["limit"] = json!(limit);
                        v["retryAfter"] = json!(retry);
                    }
                    Self::CostExceedsLimit { limit } | Self::CostExceedsQuota { limit } => {
                        v["limit"] = json!(limit);
                    }
                    _ => {}
                }
                self.add_field(&mut v);
                v
            }
            BodyStyle::Envelope => {
                let mut v = json!({ "success": false, "error": message, "timestamp": timestamp_millis(now) });
                // A 400 names its field in every style.
                self.add_field(&mut v);
                v
            }
            BodyStyle::Nested => {
                let mut inner = json!({ "code": self.code(), "message": self.nested_message() });
                if let Some(s) = retry.filter(|_| status == 429) {
                    inner["retry_after"] = json!(s);
                }
                self.add_field(&mut inner);
                json!({ "error": inner })
            }
            BodyStyle::Problem => {
                let mut v = json!({
                    "type": "about:blank",
                    "title": reason_phrase(status),
                    "status": status,
                    "detail": self.nested_message(),
                });
                self.add_field(&mut v);
                v
            }
        };
        Response { status, headers, body: body.to_string() }
    }

    /// The message of the nested and problem styles: the seed's nested 401
    /// does not distinguish missing from invalid.
    fn nested_message(&self) -> Cow<'static, str> {
        match self {
            Self::MissingCredentials | Self::InvalidCredentials => {
                "Invalid or missing API key".into()
            }
            Self::RateLimited { retry_after, .. } => format!(
                "Rate limit exceeded. Retry after {} seconds.",
                ceil_secs(*retry_after).max(1)
            )
            .into(),
            _ => self.message(),
        }
    }

    fn add_field(&self, v: &mut Value) {
        if let Self::BadRequest { field, .. } = self {
            v["field"] = json!(field);
        }
    }
}

#[cfg(feature = "http")]
impl Response {
    /// This response as an [`http::Response`] with a body
    /// of any type that can be made from a `String` (axum's `Body`,
    /// `http_body_util::Full<Bytes>`, `String` itself).
    ///
    /// Never panics. keygate writes only valid statuses, header names and
    /// values; in a response changed by hand (the fields are public), a
    /// header that is not valid is left out and a status outside 100–999
    /// becomes a 500.
    #[must_use]
    pub fn into_http<B: From<String>>(self) -> ::http::Response<B> {
        let mut out = ::http::Response::new(B::from(self.body));
        *out.status_mut() = ::http::StatusCode::from_u16(self.status)
            .unwrap_or(::http::StatusCode::INTERNAL_SERVER_ERROR);
        append_headers(out.headers_mut(), self.headers);
        out
    }
}

/// Appends keygate's `(name, value)` pairs (rejection or rate-limit
/// headers) to an [`http::HeaderMap`]. A value that is
/// not a valid header value is skipped (keygate writes none).
#[cfg(feature = "http")]
pub fn append_headers(
    map: &mut ::http::HeaderMap,
    headers: impl IntoIterator<Item = (&'static str, String)>,
) {
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) =
            (::http::HeaderName::from_bytes(name.as_bytes()), ::http::HeaderValue::try_from(value))
        {
            map.append(name, value);
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.code())
    }
}

impl std::error::Error for Rejection {}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timestamp {
        "2026-01-09T12:00:00Z".parse().unwrap()
    }

    fn body(r: &Rejection, s: BodyStyle) -> Value {
        serde_json::from_str(&r.to_response(s, t()).body).unwrap()
    }

    /// `into_http` never panics, a `Response` made or changed by hand (its
    /// fields are public) included: a status `http` cannot represent
    /// becomes a 500.
    #[cfg(feature = "http")]
    #[test]
    fn into_http_never_panics_on_a_hand_made_status() {
        for status in [0, 99, 1000, u16::MAX] {
            let r = Response { status, headers: vec![("x-a", "b".into())], body: "{}".into() };
            let out = r.into_http::<String>();
            assert_eq!(out.status(), 500, "{status}");
            assert_eq!(out.headers()["x-a"], "b");
        }
    }

    #[test]
    fn seed_bodies_in_the_seeds_key_order() {
        // Byte for byte, keys in the order the seeds print them.
        let text = |r: &Rejection, s| r.to_response(s, t()).body;
        let rl = Rejection::RateLimited { limit: 50, retry_after: Duration::from_millis(200) };
        assert_eq!(
            text(&rl, BodyStyle::Flat),
            r#"{"error":"Rate limit exceeded","limit":50,"retryAfter":1}"#
        );
        assert_eq!(
            text(&rl, BodyStyle::Envelope),
            r#"{"success":false,"error":"Rate limit exceeded","timestamp":"2026-01-09T12:00:00.000Z"}"#
        );
        assert_eq!(
            text(&Rejection::InvalidCredentials, BodyStyle::Nested),
            r#"{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}"#
        );
    }

    #[test]
    fn a_scope_outside_the_header_syntax_is_left_out() {
        // RFC 6750: space-separated tokens, none empty.
        for bad in ["a\"\r\nX-Injected: y", "", " a", "a  b", "a "] {
            let r = Rejection::Forbidden { scope: Some(bad.into()) };
            let header = r.www_authenticate();
            assert_eq!(header.as_deref(), Some("Bearer error=\"insufficient_scope\""), "{bad:?}");
        }
        let r = Rejection::Forbidden { scope: Some("a:b c:d".into()) };
        assert!(r.www_authenticate().unwrap().ends_with("scope=\"a:b c:d\""));
        let r = Rejection::Forbidden { scope: Some("webhooks:write".into()) };
        assert_eq!(
            r.www_authenticate().as_deref(),
            Some("Bearer error=\"insufficient_scope\", scope=\"webhooks:write\"")
        );
    }

    #[test]
    fn a_misconfiguration_is_a_500_without_retry_after() {
        let r = Rejection::Misconfigured;
        for style in [BodyStyle::Flat, BodyStyle::Envelope, BodyStyle::Nested, BodyStyle::Problem] {
            let res = r.to_response(style, t());
            assert_eq!(res.status, 500);
            assert!(res.header("Retry-After").is_none(), "{style:?}");
        }
        assert_eq!(
            body(&r, BodyStyle::Nested),
            json!({"error": {"code": "internal_error", "message": "Internal server error"}})
        );
    }

    #[test]
    fn seed_bodies_exactly() {
        assert_eq!(
            body(&Rejection::MissingCredentials, BodyStyle::Envelope),
            json!({"success": false, "error": "API key is missing", "timestamp": "2026-01-09T12:00:00.000Z"})
        );
        assert_eq!(
            body(&Rejection::InvalidCredentials, BodyStyle::Envelope),
            json!({"success": false, "error": "Invalid API key", "timestamp": "2026-01-09T12:00:00.000Z"})
        );
        assert_eq!(
            body(&Rejection::InvalidCredentials, BodyStyle::Nested),
            json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}})
        );
        assert_eq!(
            body(&Rejection::Forbidden { scope: None }, BodyStyle::Nested),
            json!({"error": {"code": "forbidden", "message": "API key does not have access to this resource"}})
        );
        let rl = Rejection::RateLimited { limit: 50, retry_after: Duration::from_millis(200) };
        assert_eq!(
            body(&rl, BodyStyle::Flat),
            json!({"error": "Rate limit exceeded", "limit": 50, "retryAfter": 1})
        );
        assert_eq!(
            body(&rl, BodyStyle::Envelope),
            json!({"success": false, "error": "Rate limit exceeded", "timestamp": "2026-01-09T12:00:00.000Z"})
        );
        let rl60 = Rejection::RateLimited { limit: 100, retry_after: Duration::from_secs(60) };
        assert_eq!(
            body(&rl60, BodyStyle::Nested),
            json!({"error": {"code": "rate_limit_exceeded", "message": "Rate limit exceeded. Retry after 60 seconds.", "retry_after": 60}})
        );
        let q = Rejection::QuotaExceeded {
            used: 100,
            limit: 100,
            resets_at: "2026-02-01T00:00:00Z".parse().unwrap(),
        };
        assert_eq!(
            body(&q, BodyStyle::Envelope)["error"],
            "Monthly usage limit exceeded (100/100). Upgrade your plan or wait for reset on 2/1/2026."
        );
    }

    #[test]
    fn headers() {
        let r = Rejection::MissingCredentials.to_response(BodyStyle::Nested, t());
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = Rejection::InvalidCredentials.to_response(BodyStyle::Nested, t());
        assert_eq!(r.header("WWW-Authenticate"), Some("Bearer error=\"invalid_token\""));
        let r = Rejection::Forbidden { scope: Some("webhooks:write".into()) }
            .to_response(BodyStyle::Problem, t());
        assert_eq!(r.status, 403);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(
            r.header("WWW-Authenticate"),
            Some("Bearer error=\"insufficient_scope\", scope=\"webhooks:write\"")
        );
        let r = Rejection::RateLimited { limit: 3, retry_after: Duration::from_millis(1) }
            .to_response(BodyStyle::Flat, t());
        assert_eq!(r.header("Retry-After"), Some("1"));
    }

    #[test]
    fn ceil_secs_never_zero_for_a_wait() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX, "saturates, never wraps to 0");
    }

    #[test]
    fn timestamp_has_millis() {
        assert_eq!(timestamp_millis(t()), "2026-01-09T12:00:00.000Z");
        let t2: Timestamp = "2026-01-09T12:00:00.1234Z".parse().unwrap();
        assert_eq!(timestamp_millis(t2), "2026-01-09T12:00:00.123Z");
        // Truncated toward the past before 1970 too, not into the next second.
        let early = Timestamp::new(-1, 999_500_000).unwrap();
        assert_eq!(timestamp_millis(early), "1969-12-31T23:59:59.999Z");
    }

    /// The problem style titles each status with its reason phrase.
    #[test]
    fn problem_bodies_title_each_status() {
        let quota = Rejection::QuotaExceeded {
            used: 5,
            limit: 5,
            resets_at: "2026-02-01T00:00:00Z".parse().unwrap(),
        };
        for (r, status, title) in [
            (
                Rejection::BadRequest { field: "name".into(), message: "name is empty".into() },
                400,
                "Bad Request",
            ),
            (Rejection::InvalidCredentials, 401, "Unauthorized"),
            (Rejection::AccountInactive, 403, "Forbidden"),
            (Rejection::NotFound, 404, "Not Found"),
            (Rejection::Conflict { message: "key limit reached".into() }, 409, "Conflict"),
            (Rejection::Gone, 410, "Gone"),
            (quota, 429, "Too Many Requests"),
            (Rejection::Misconfigured, 500, "Internal Server Error"),
            (Rejection::Unavailable, 503, "Service Unavailable"),
        ] {
            let v = body(&r, BodyStyle::Problem);
            assert_eq!((&v["title"], &v["status"]), (&json!(title), &json!(status)), "{r:?}");
        }
        assert_eq!(
            body(&Rejection::NotFound, BodyStyle::Problem),
            json!({"type": "about:blank", "title": "Not Found", "status": 404, "detail": "Not found"})
        );
    }

    /// A used-up quota is retried when it resets (in whole seconds, rounded
    /// up, at least one), an outage after a second; the other refusals,
    /// where no wait helps, carry no `Retry-After`.
    #[test]
    fn retry_after_for_a_used_up_quota_and_an_outage() {
        let quota = |resets_at: &str| Rejection::QuotaExceeded {
            used: 5,
            limit: 5,
            resets_at: resets_at.parse().unwrap(),
        };
        let month_end = quota("2026-01-09T12:01:00.001Z");
        assert_eq!(month_end.retry_after_secs(t()), Some(61));
        assert_eq!(month_end.to_response(BodyStyle::Flat, t()).header("Retry-After"), Some("61"));
        assert_eq!(body(&month_end, BodyStyle::Nested)["error"]["retry_after"], 61);
        assert_eq!(quota("2026-01-09T11:00:00Z").retry_after_secs(t()), Some(1));
        let outage = Rejection::Unavailable.to_response(BodyStyle::Nested, t());
        assert_eq!((outage.status, outage.header("Retry-After")), (503, Some("1")));
        for r in [
            Rejection::CostExceedsLimit { limit: 5 },
            Rejection::CostExceedsQuota { limit: 5 },
            Rejection::Forbidden { scope: None },
        ] {
            assert_eq!(r.retry_after_secs(t()), None, "{r:?}");
        }
    }

    /// A cost no wait can meet is refused with the limit it exceeds, and
    /// its status and code read as one line.
    #[test]
    fn a_cost_over_the_limit_names_the_limit() {
        let rate = Rejection::CostExceedsLimit { limit: 50 };
        assert_eq!(
            body(&rate, BodyStyle::Flat),
            json!({"error": "Request cost exceeds the rate limit", "limit": 50})
        );
        let quota = Rejection::CostExceedsQuota { limit: 1000 };
        assert_eq!(
            body(&quota, BodyStyle::Flat),
            json!({"error": "Request cost exceeds the monthly usage limit (1000).", "limit": 1000})
        );
        assert_eq!(rate.to_string(), "429 rate_limit_exceeded");
        assert_eq!(quota.to_string(), "429 quota_exceeded");
    }

    #[test]
    fn bad_request_names_field() {
        let r = Rejection::BadRequest {
            field: "expiresInMinutes".into(),
            message: "expiresInMinutes must be between 1 and 60".into(),
        };
        let v = body(&r, BodyStyle::Nested);
        assert_eq!(v["error"]["field"], "expiresInMinutes");
        assert_eq!(r.to_response(BodyStyle::Flat, t()).status, 400);
        // Every style names it.
        for style in [BodyStyle::Flat, BodyStyle::Envelope, BodyStyle::Problem] {
            assert_eq!(body(&r, style)["field"], "expiresInMinutes", "{style:?}");
        }
    }
}
