//! The HTML pages of the launch: login, consent and errors. Self-contained (inline CSS, no
//! scripts, no external assets), every dynamic value escaped, and framed by no one.
//!
//! Forms post to relative URLs (`login`, `consent`), so the pages work under any path prefix.
//! Field names and ids are stable for browser tests: `username`, `password`, `csrf`, `pending`;
//! checkboxes `scope` (value = the scope); buttons `decision` = `approve` | `deny`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::scopes::Scope;

/// HTML-escapes text for element content and double-quoted attributes.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f4f6f8;color:#1d2733;margin:0}\
main{max-width:30rem;margin:3rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px rgba(0,0,0,.12)}\
h1{font-size:1.35rem;margin-top:0}label{display:block;margin:.9rem 0 .3rem;font-weight:600}\
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.55rem;font-size:1rem;border:1px solid #9aa5b1;border-radius:4px}\
button{margin-top:1.2rem;padding:.6rem 1.2rem;font-size:1rem;border-radius:4px;border:1px solid #1f5fa8;background:#1f5fa8;color:#fff;cursor:pointer}\
button.secondary{background:#fff;color:#1f5fa8;margin-left:.5rem}\
.error{background:#fdecea;border:1px solid #f5c2c0;color:#8a1c17;padding:.6rem .8rem;border-radius:4px}\
ul{padding-left:0;list-style:none}li{margin:.55rem 0}li label{display:inline;font-weight:normal;margin:0}\
.fixed{color:#4a5663}.muted{color:#4a5663;font-size:.9rem}code{font-size:.8rem;color:#4a5663}";

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>\n",
        esc(title)
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    // No framing (clickjacking on the consent page), no scripts, no referrer leaking the query.
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// A page for a request that cannot be sent back to the app (unknown client, a redirect URI
/// that is not registered, an expired form): no redirect, only an explanation.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<h1>This sign-in request cannot continue</h1><p class=\"error\" id=\"error\">{}</p>\
         <p class=\"muted\">Return to the app and start again.</p>",
        esc(message)
    );
    page(status, "Sign-in error", &body)
}

/// `username` is kept after a failed attempt, so the member only retypes the password.
pub(crate) fn login_page(
    client_name: &str,
    pending: &str,
    csrf: &str,
    username: &str,
    error: Option<&str>,
) -> Response {
    let error =
        error.map(|e| format!("<p class=\"error\" id=\"error\" role=\"alert\">{}</p>", esc(e))).unwrap_or_default();
    let body = format!(
        "<h1>Sign in to your health plan</h1>\
         <p><strong>{client}</strong> is asking to connect to your health plan records.</p>{error}\
         <form method=\"post\" action=\"login\" id=\"login-form\">\
         <input type=\"hidden\" name=\"pending\" id=\"pending\" value=\"{pending}\">\
         <input type=\"hidden\" name=\"csrf\" id=\"csrf\" value=\"{csrf}\">\
         <label for=\"username\">Username</label>\
         <input type=\"text\" name=\"username\" id=\"username\" value=\"{user}\" autocomplete=\"username\" required autofocus>\
         <label for=\"password\">Password</label>\
         <input type=\"password\" name=\"password\" id=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>",
        client = esc(client_name),
        pending = esc(pending),
        csrf = esc(csrf),
        user = esc(username),
    );
    page(StatusCode::OK, "Sign in", &body)
}

pub(crate) fn consent_page(client_name: &str, username: &str, pending: &str, csrf: &str, scopes: &[Scope]) -> Response {
    let mut items = String::new();
    for (i, s) in scopes.iter().enumerate() {
        let value = s.to_string();
        if s.is_required_for_launch() {
            items.push_str(&format!(
                "<li class=\"fixed\">&#10003; {} <code>{}</code></li>",
                esc(&s.describe()),
                esc(&value)
            ));
        } else {
            items.push_str(&format!(
                "<li><input type=\"checkbox\" name=\"scope\" id=\"scope-{i}\" value=\"{v}\" checked> \
                 <label for=\"scope-{i}\">{d} <code>{v}</code></label></li>",
                v = esc(&value),
                d = esc(&s.describe()),
            ));
        }
    }
    let body = format!(
        "<h1>Allow {client} to access your records?</h1>\
         <p class=\"muted\">Signed in as {user}.</p>\
         <p>{client} is asking to:</p>\
         <form method=\"post\" action=\"consent\" id=\"consent-form\">\
         <input type=\"hidden\" name=\"pending\" id=\"pending\" value=\"{pending}\">\
         <input type=\"hidden\" name=\"csrf\" id=\"csrf\" value=\"{csrf}\">\
         <ul>{items}</ul>\
         <p class=\"muted\">Untick anything you do not want to share.</p>\
         <button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\" class=\"secondary\">Deny</button>\
         </form>",
        client = esc(client_name),
        user = esc(username),
        pending = esc(pending),
        csrf = esc(csrf),
    );
    page(StatusCode::OK, "Allow access", &body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn escapes_everything_dynamic() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
