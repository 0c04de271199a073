//! Who is looking, and whether a form post really comes from the dashboard.
//!
//! A browser signs in with an admin token through the login form, which sets it as an
//! `HttpOnly; SameSite=Strict` cookie scoped to `/dashboard`; scripts and curl may send
//! `Authorization: Bearer` instead. Either way the token is checked by [`Tokens`] (SHA-256
//! digests compared in constant time) on every request, so a token removed from the
//! config stops working at the next restart, and several instances accept the same cookie.
//!
//! Cross-site requests cannot act: actions are POST only; a cookie is not sent on
//! cross-site requests (`SameSite=Strict`); a POST whose `Origin` names another site is
//! refused; and every form carries a CSRF token derived from the session's token, checked
//! in constant time, which another site cannot read. A bearer token is not something a
//! browser adds on its own, so bearer requests need no CSRF token.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use super::{DashboardState, pages};
use crate::auth::{Principal, Scope};

const COOKIE: &str = "ferry_dashboard";
const FLASH_COOKIE: &str = "ferry_dashboard_flash";

/// The largest form body the dashboard reads (a reason and a few names).
pub(super) const FORM_LIMIT: usize = 16 * 1024;

/// A signed-in operator: an admin token, and how it came.
#[derive(Debug)]
pub(super) struct Operator<'a> {
    pub(super) principal: &'a Principal,
    token: String,
    by_cookie: bool,
}

impl Operator<'_> {
    /// The CSRF token of this session's forms.
    pub(super) fn csrf(&self) -> String {
        csrf_for(&self.token)
    }
}

fn csrf_for(token: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"ferry-dashboard-csrf\0")
        .chain_update(token.as_bytes())
        .finalize();
    URL_SAFE_NO_PAD.encode(digest)
}

fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The admin operator behind this request, if any.
pub(super) fn operator<'a>(
    dashboard: &'a DashboardState,
    headers: &HeaderMap,
) -> Option<Operator<'a>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| (t.trim().to_owned(), false));
    let (token, by_cookie) = bearer.or_else(|| {
        let raw = URL_SAFE_NO_PAD
            .decode(cookie_value(headers, COOKIE)?)
            .ok()?;
        Some((String::from_utf8(raw).ok()?, true))
    })?;
    let principal = dashboard.tokens.authenticate(&token)?;
    principal.may(&[Scope::Admin]).then_some(Operator {
        principal,
        token,
        by_cookie,
    })
}

/// Whether a POST came from a page of this dashboard: its `Origin`, when sent, is this
/// host; cookie sessions must also bring the form's CSRF token.
pub(super) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| o.split_once("://"));
    matches!((origin, host), (Some((_, origin_host)), Some(host)) if origin_host == host)
}

/// Refuses a POST that may come from another site: see the module's doc.
pub(super) fn check_post(
    operator: &Operator<'_>,
    headers: &HeaderMap,
    csrf: Option<&str>,
) -> Result<(), Refused> {
    if !same_origin(headers) {
        warn!(token = %operator.principal.name, "dashboard: cross-site POST refused");
        return Err(refused(
            StatusCode::FORBIDDEN,
            "cross-site request refused: post from the dashboard's own pages",
        ));
    }
    if operator.by_cookie {
        let expected = operator.csrf();
        let sent = csrf.unwrap_or("");
        if !bool::from(expected.as_bytes().ct_eq(sent.as_bytes())) {
            warn!(token = %operator.principal.name, "dashboard: POST without a valid CSRF token refused");
            return Err(refused(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or stale: reload the page and try again",
            ));
        }
    }
    Ok(())
}

/// Why a request is refused.
#[derive(Debug)]
pub(super) enum Refused {
    /// No admin token: the login form, with why.
    SignIn(&'static str),
    /// Anything else, as plain text.
    Plain(StatusCode, String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn(why) => sign_in_required(Some(why)),
            Refused::Plain(status, message) => (
                status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                message,
            )
                .into_response(),
        }
    }
}

fn refused(status: StatusCode, message: &str) -> Refused {
    Refused::Plain(status, message.to_owned())
}

/// What a page that needs a sign-in answers without one: 401 with the login form.
pub(super) fn sign_in_required(error: Option<&str>) -> Response {
    let mut response = pages::login(error).into_response();
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ferry dashboard\""),
    );
    response
}

pub(super) async fn login_page() -> Response {
    pages::login(None).into_response()
}

/// Checks the token of the login form and, if it is an admin token, sets the cookie.
pub(super) async fn login(
    State(dashboard): State<DashboardState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !same_origin(&headers) {
        return refused(
            StatusCode::FORBIDDEN,
            "cross-site request refused: sign in from the dashboard's own page",
        )
        .into_response();
    }
    let form = match read_form(&headers, body).await {
        Ok(form) => form,
        Err(refusal) => return refusal.into_response(),
    };
    let token = form_field(&form, "token").unwrap_or_default();
    let Some(principal) = dashboard.tokens.authenticate(token.trim()) else {
        warn!("dashboard: sign-in with an unknown token refused");
        return sign_in_required(Some("unknown token"));
    };
    if !principal.may(&[Scope::Admin]) {
        warn!(token = %principal.name, "dashboard: sign-in refused, not an admin token");
        return sign_in_required(Some("this token has no admin scope"));
    }
    info!(token = %principal.name, "dashboard: signed in");
    let cookie = format!(
        "{COOKIE}={}; Path=/dashboard; HttpOnly; SameSite=Strict",
        URL_SAFE_NO_PAD.encode(token.trim())
    );
    redirect("/dashboard", Some(cookie))
}

pub(super) async fn logout(headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return refused(StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    let cookie = format!("{COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0");
    redirect("/dashboard/login", Some(cookie))
}

/// 303 to `to`, setting `cookie` if given.
pub(super) fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// A one-time message for the next page (what an action did), in a short-lived cookie.
pub(super) fn flash(message: &str) -> String {
    format!(
        "{FLASH_COOKIE}={}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=60",
        URL_SAFE_NO_PAD.encode(message)
    )
}

/// The flash message of this request, and the header that clears it.
pub(super) fn take_flash(headers: &HeaderMap) -> Option<(String, HeaderValue)> {
    let raw = URL_SAFE_NO_PAD
        .decode(cookie_value(headers, FLASH_COOKIE)?)
        .ok()?;
    let message = String::from_utf8(raw).ok()?;
    let clear = HeaderValue::from_str(&format!(
        "{FLASH_COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
    .ok()?;
    Some((message, clear))
}

/// Reads an `application/x-www-form-urlencoded` body of at most [`FORM_LIMIT`] bytes.
pub(super) async fn read_form(
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<(String, String)>, Refused> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the form as application/x-www-form-urlencoded",
        ));
    }
    let bytes = crate::api::read_body(body, FORM_LIMIT)
        .await
        .map_err(|err| Refused::Plain(err.status(), err.message().to_owned()))?;
    Ok(url::form_urlencoded::parse(&bytes).into_owned().collect())
}

pub(super) fn form_field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).expect("valid"));
        }
        map
    }

    #[test]
    fn origin_must_be_this_host_when_sent() {
        assert!(same_origin(&headers(&[(header::HOST, "127.0.0.1:8080")])));
        assert!(same_origin(&headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://127.0.0.1:8080"),
        ])));
        assert!(!same_origin(&headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "https://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[(header::ORIGIN, "null")])));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let map = headers(&[(header::COOKIE, "a=1; ferry_dashboard=abc; b=2")]);
        assert_eq!(cookie_value(&map, COOKIE), Some("abc"));
        assert_eq!(cookie_value(&map, "c"), None);
        assert_ne!(
            csrf_for("one-token-0123456789"),
            csrf_for("two-token-0123456789")
        );
    }
}
