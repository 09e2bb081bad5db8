//! The console's layout and the small pieces every page uses.

use handoff_proto::pb;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::Visitor;

/// A value made safe as one path segment of a link.
pub(crate) fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A page: header with navigation, the content in `main`.
pub(crate) fn layout(
    title: &str,
    visitor: Option<&Visitor>,
    live: Option<&str>,
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · handoff" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body data-live=[live] {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "handoff" }
                    nav aria-label="Main" {
                        a href="/" { "Runs" }
                        a href="/agents" { "Agents" }
                        a href="/contracts" { "Contracts" }
                        a href="/barriers" { "Barriers" }
                    }
                    @if let Some(v) = visitor {
                        span.who { "Signed in as " strong { (v.caller.principal) } }
                        @if v.signed_in {
                            form.signout method="post" action="/signout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    span.live-state id="live-state" aria-live="polite" {}
                }
                main id="main" tabindex="-1" { (content) }
            }
        }
    }
}

/// The sign-in page (the only page shown without a session).
pub(crate) fn signin_page(problem: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        None,
        html! {
            h1 { "Sign in" }
            p { "Sign in with an API token (" code { "handoffctl token create" } "). It is kept in this console's memory for the session and never shown." }
            @if let Some(p) = problem {
                p.error role="alert" data-reason="UNAUTHENTICATED" { (p) }
            }
            form id="signin" method="post" action="/signin" {
                label for="token" { "API token" }
                input id="token" name="token" type="password" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A refusal or other message, with its stable reason.
pub(crate) fn message_page(
    title: &str,
    reason: &str,
    text: &str,
    visitor: Option<&Visitor>,
) -> Markup {
    layout(
        title,
        visitor,
        None,
        html! {
            h1 { (title) }
            p.error role="alert" data-reason=(reason) { strong { (reason) } ": " (text) }
            p { a href="/" { "Back to the runs" } }
        },
    )
}

/// A time as `YYYY-MM-DD HH:MM:SS.mmm` UTC.
pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "—".to_string() };
    match std::time::SystemTime::try_from(*t) {
        Ok(st) => {
            let text = humantime::format_rfc3339_millis(st).to_string();
            text.replace('T', " ").trim_end_matches('Z').to_string()
        }
        Err(_) => "—".to_string(),
    }
}

/// A short form of an id.
pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The token of a run status (`running`, `completed`, ...).
pub(crate) fn status(status: i32) -> &'static str {
    pb::RunStatus::try_from(status).map_or("unknown", pb::RunStatus::token)
}

/// A status badge.
pub(crate) fn badge(token: &str) -> Markup {
    html! { span class={ "badge s-" (token) } { (token.replace('_', " ")) } }
}

/// A duration in words.
pub(crate) fn age(d: Option<&prost_types::Duration>) -> String {
    match d.and_then(|d| std::time::Duration::try_from(*d).ok()) {
        Some(d) => humantime::format_duration(std::time::Duration::from_millis(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        ))
        .to_string(),
        None => "—".to_string(),
    }
}

/// JSON text shown as code.
pub(crate) fn json_block(label: &str, text: &str) -> Markup {
    html! {
        pre.payload-json aria-label=(label) tabindex="0" { code { (text) } }
    }
}

/// Raw bytes as hexadecimal, 32 per line.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Inline SVG from a builder whose text is escaped where it is built.
pub(crate) fn svg(text: String) -> Markup {
    PreEscaped(text)
}
