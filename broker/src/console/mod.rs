//! The web console (`console_listen`): server-rendered pages over the same
//! use cases as the gRPC calls, with live updates by Server-Sent Events.
//!
//! Who may see and do what is decided exactly as for gRPC: each page and
//! action calls the use case with the signed-in principal's [`Caller`],
//! and a refusal shows its reason. With auth on, a visitor signs in with
//! an API token; the token stays in this replica's memory, behind a
//! random session id in an `HttpOnly`, `SameSite=Strict` cookie that
//! expires after [`SESSION_TTL`], and is authenticated again on every
//! request (a revoked token ends its sessions). Every action is a POST
//! that carries the session's CSRF token and, when the browser names
//! one, an `Origin` of this console. Nothing secret is rendered.

mod graph;
mod json;
mod pages;
mod view;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
    routing::{get, post},
    Form, Router,
};
use dashmap::DashMap;
use futures::StreamExt as _;
use handoff_proto::pb;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::{
    app::{
        auth::{self, Caller, Credentials},
        Broker,
    },
    error::BrokerError,
    rules::grants::Action,
};

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most (the oldest are dropped past it).
const MAX_SESSIONS: usize = 10_000;
/// The session cookie.
const COOKIE: &str = "handoff_session";
/// How often a live stream checks that its session still stands.
const LIVE_CHECK: Duration = Duration::from_secs(2);

/// A signed-in (or, without auth, anonymous) browser.
#[derive(Clone)]
struct Session {
    /// The API token it signed in with (`None` without auth).
    token: Option<String>,
    /// The token every action must carry.
    csrf: String,
    expires: Instant,
}

/// What the console's handlers share.
#[derive(Clone)]
struct Console {
    broker: Broker,
    sessions: Arc<DashMap<String, Session>>,
    /// Served over TLS: the session cookie is `Secure`.
    secure: bool,
    /// Without auth on a loopback address: the `Host` names it may be
    /// reached by (so a page whose name is rebound to 127.0.0.1 gets
    /// nothing); `None`: any.
    hosts: Option<Arc<Vec<String>>>,
}

/// Who is asking, and what their forms must carry.
pub(crate) struct Visitor {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
    /// Whether auth is on (sign-out shown).
    pub(crate) signed_in: bool,
    /// A new session's cookie to set.
    set_cookie: Option<String>,
}

impl Visitor {
    /// Whether the visitor may act in runs of `owner` (cancel, answer,
    /// redrive, fork), as the use cases decide.
    pub(crate) fn may_own(&self, owner: &str) -> bool {
        self.caller.may(Action::Own, owner)
    }
}

/// Serves the console on `listener` (over TLS with `tls`) until the task
/// is dropped.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) {
    let hosts = match listener.local_addr() {
        Ok(addr) if addr.ip().is_loopback() && !broker.auth().enabled() => {
            let port = addr.port();
            // A page's name cannot be one of these, so none is a rebound
            // name (bare names too: clients that leave the port out).
            Some(Arc::new(vec![
                addr.to_string(),
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "[::1]".to_string(),
            ]))
        }
        _ => None,
    };
    let console = Console {
        broker,
        sessions: Arc::new(DashMap::new()),
        secure: tls.is_some(),
        hosts,
    };
    let app = router(console);
    let Some(tls) = tls else {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "console stopped");
        }
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause, go on.
                tracing::warn!(error = %e, "console: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(crate::tls::CONSOLE_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "console: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let served =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(io, service)
                    .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "console: connection ended");
            }
        });
    }
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(runs_page))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/runs/{run_id}", get(run_page))
        .route("/runs/{run_id}/handoffs/{handoff_id}", get(handoff_page))
        .route("/runs/{run_id}/cancel", post(cancel))
        .route("/runs/{run_id}/inputs/{request_id}", post(answer))
        .route("/runs/{run_id}/fork", post(fork))
        .route("/dead-letters/{sequence}/redrive", post(redrive))
        .route("/agents", get(agents_page))
        .route("/agents/{name}", get(agent_page))
        .route("/contracts", get(contracts_page))
        .route("/barriers", get(barriers_page))
        .route("/live", get(live))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .with_state(console)
}

// ------------------------------------------------------------ sessions

fn random_token() -> String {
    let mut buf = [0u8; 32];
    if getrandom::fill(&mut buf).is_err() {
        // No randomness: no session can be made safely.
        return String::new();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn session_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

impl Console {
    fn auth_on(&self) -> bool {
        self.broker.auth().enabled()
    }

    fn new_session(&self, token: Option<String>) -> Option<(String, Session)> {
        let id = random_token();
        let csrf = random_token();
        if id.is_empty() || csrf.is_empty() {
            return None;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            let now = Instant::now();
            self.sessions.retain(|_, s| s.expires > now);
            if self.sessions.len() >= MAX_SESSIONS {
                let oldest = self
                    .sessions
                    .iter()
                    .min_by_key(|s| s.expires)
                    .map(|s| s.key().clone());
                if let Some(oldest) = oldest {
                    self.sessions.remove(&oldest);
                }
            }
        }
        let session = Session {
            token,
            csrf,
            expires: Instant::now() + SESSION_TTL,
        };
        self.sessions.insert(id.clone(), session.clone());
        Some((id, session))
    }

    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie_value(headers, COOKIE)?;
        let session = self.sessions.get(&id).map(|s| s.clone())?;
        if session.expires <= Instant::now() {
            self.sessions.remove(&id);
            return None;
        }
        Some((id, session))
    }

    /// The visitor of a request; `Err`: the sign-in page (or a refusal
    /// for an action and the live stream).
    async fn visitor(&self, headers: &HeaderMap) -> Result<Visitor, Refused> {
        if let Some(hosts) = &self.hosts {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
            if !host.is_some_and(|h| hosts.iter().any(|a| a.eq_ignore_ascii_case(h))) {
                return Err(Refused::Host);
            }
        }
        let session = self.session(headers);
        if !self.auth_on() {
            // No auth: everyone is the local caller; a session only
            // carries the CSRF token.
            let (set_cookie, csrf) = match session {
                Some((_, s)) => (None, s.csrf),
                None => {
                    let (id, s) = self.new_session(None).ok_or(Refused::SignIn)?;
                    (Some(session_cookie(&id, SESSION_TTL, self.secure)), s.csrf)
                }
            };
            return Ok(Visitor {
                caller: Caller::local(),
                csrf,
                signed_in: false,
                set_cookie,
            });
        }
        let Some((id, session)) = session else {
            return Err(Refused::SignIn);
        };
        let creds = Credentials {
            bearer: session.token.clone(),
            ..Default::default()
        };
        match auth::authenticate(&self.broker, &creds).await {
            Ok(caller) => Ok(Visitor {
                caller,
                csrf: session.csrf,
                signed_in: true,
                set_cookie: None,
            }),
            Err(e) if e.class() == crate::error::Class::Unauthenticated => {
                self.sessions.remove(&id);
                tracing::debug!(reason = %e.reason(), "console session refused");
                Err(Refused::SignIn)
            }
            // NATS away and the like: the session stays.
            Err(e) => Err(Refused::Unavailable(e.to_string())),
        }
    }

    /// Whether the session behind `headers` still stands (not signed
    /// out, not expired, its token still valid).
    async fn still_signed_in(&self, headers: &HeaderMap) -> bool {
        match self.session(headers) {
            None => !self.auth_on(),
            Some((_, s)) => {
                let creds = Credentials {
                    bearer: s.token.clone(),
                    ..Default::default()
                };
                !matches!(
                    auth::authenticate(&self.broker, &creds).await,
                    Err(e) if e.class() == crate::error::Class::Unauthenticated
                )
            }
        }
    }

    /// The visitor of an action: signed in, with the session's CSRF token
    /// and, if the browser names one, this console's origin.
    async fn actor(&self, headers: &HeaderMap, csrf: &str) -> Result<Visitor, Refused> {
        if !same_origin(headers) {
            return Err(Refused::Forged);
        }
        let Some((_, session)) = self.session(headers) else {
            return Err(Refused::Forged);
        };
        if !constant_eq(csrf, &session.csrf) {
            return Err(Refused::Forged);
        }
        match self.visitor(headers).await {
            Ok(v) if v.set_cookie.is_none() => Ok(v),
            Ok(_) => Err(Refused::Forged),
            Err(e) => Err(e),
        }
    }
}

fn constant_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    !b.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Whether the request's `Origin` (when the browser sends one) is this
/// console's own host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    origin_host == host
}

/// Why a request is not served.
enum Refused {
    /// Not signed in: the sign-in page.
    SignIn,
    /// An action without this session's CSRF token, from another origin,
    /// or without a session.
    Forged,
    /// A `Host` this console does not answer to (see `Console::hosts`).
    Host,
    /// The broker cannot authenticate now.
    Unavailable(String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn => Redirect::to("/signin").into_response(),
            Refused::Forged => page_response(
                StatusCode::FORBIDDEN,
                None,
                view::message_page(
                    "Refused",
                    "FORGED_REQUEST",
                    "This action did not come from a form of this console's session. Reload the page and try again.",
                    None,
                ),
            ),
            Refused::Host => page_response(
                StatusCode::MISDIRECTED_REQUEST,
                None,
                view::message_page(
                    "Refused",
                    "UNKNOWN_HOST",
                    "This console answers to its own address only (localhost or 127.0.0.1 and its port).",
                    None,
                ),
            ),
            Refused::Unavailable(why) => page_response(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                view::message_page("Unavailable", "NATS_UNAVAILABLE", &why, None),
            ),
        }
    }
}

// ------------------------------------------------------------ responses

fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn page_response(status: StatusCode, set_cookie: Option<String>, markup: maud::Markup) -> Response {
    let mut resp = (status, markup).into_response();
    secure_headers(&mut resp);
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    resp
}

/// A page for a visitor, or the page of the error that refused it.
fn respond(visitor: &Visitor, page: Result<maud::Markup, BrokerError>) -> Response {
    match page {
        Ok(markup) => page_response(StatusCode::OK, visitor.set_cookie.clone(), markup),
        Err(e) => error_response(Some(visitor), &e),
    }
}

fn error_response(visitor: Option<&Visitor>, e: &BrokerError) -> Response {
    use crate::error::Class;
    let status = match e.class() {
        Class::NotFound => StatusCode::NOT_FOUND,
        Class::PermissionDenied => StatusCode::FORBIDDEN,
        Class::Unauthenticated => StatusCode::UNAUTHORIZED,
        Class::InvalidArgument | Class::OutOfRange => StatusCode::BAD_REQUEST,
        Class::FailedPrecondition | Class::AlreadyExists | Class::Aborted => StatusCode::CONFLICT,
        Class::Unavailable | Class::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    page_response(
        status,
        visitor.and_then(|v| v.set_cookie.clone()),
        view::message_page("Refused", e.reason().as_str(), &e.to_string(), visitor),
    )
}

/// After an action: back to the page it was taken on.
fn see_other(to: &str) -> Response {
    let mut resp = Redirect::to(to).into_response();
    secure_headers(&mut resp);
    resp
}

// ------------------------------------------------------------ sign-in

async fn signin_page(State(c): State<Console>) -> Response {
    if !c.auth_on() {
        return see_other("/");
    }
    page_response(StatusCode::OK, None, view::signin_page(None))
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
}

async fn signin(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if !c.auth_on() {
        return see_other("/");
    }
    if !same_origin(&headers) {
        return Refused::Forged.into_response();
    }
    let token = form.token.trim().to_string();
    let creds = Credentials {
        bearer: (!token.is_empty()).then(|| token.clone()),
        ..Default::default()
    };
    match auth::authenticate(&c.broker, &creds).await {
        Ok(caller) => {
            let Some((id, _)) = c.new_session(Some(token)) else {
                return page_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    view::signin_page(Some("No session could be made; try again.")),
                );
            };
            tracing::info!(principal = %caller.principal, "console sign-in");
            let mut resp = see_other("/");
            if let Ok(cookie) = HeaderValue::from_str(&session_cookie(&id, SESSION_TTL, c.secure)) {
                resp.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            resp
        }
        Err(e) => page_response(
            StatusCode::UNAUTHORIZED,
            None,
            view::signin_page(Some(&format!(
                "Not signed in ({}): the token is unknown, revoked or expired.",
                e.reason().as_str()
            ))),
        ),
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn signout(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Response {
    if let Err(refused) = c.actor(&headers, &form.csrf).await {
        return refused.into_response();
    }
    if let Some(id) = cookie_value(&headers, COOKIE) {
        c.sessions.remove(&id);
    }
    let mut resp = see_other(if c.auth_on() { "/signin" } else { "/" });
    if let Ok(cookie) = HeaderValue::from_str(&session_cookie("", Duration::ZERO, c.secure)) {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    resp
}

// ------------------------------------------------------------ pages

async fn runs_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(filter): Query<pages::RunsFilter>,
) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::runs(&c.broker, &visitor, &filter).await;
    respond(&visitor, page)
}

async fn run_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::run(&c.broker, &visitor, &run_id).await;
    respond(&visitor, page)
}

#[derive(Deserialize)]
struct HandoffQuery {
    #[serde(default)]
    raw: bool,
}

async fn handoff_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((run_id, handoff_id)): Path<(String, String)>,
    Query(q): Query<HandoffQuery>,
) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::handoff(&c.broker, &visitor, &run_id, &handoff_id, q.raw).await;
    respond(&visitor, page)
}

async fn agents_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::agents(&c.broker, &visitor, None).await;
    respond(&visitor, page)
}

async fn agent_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::agents(&c.broker, &visitor, Some(&name)).await;
    respond(&visitor, page)
}

async fn contracts_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::contracts(&c.broker, &visitor).await;
    respond(&visitor, page)
}

async fn barriers_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = pages::barriers(&c.broker, &visitor).await;
    respond(&visitor, page)
}

// ------------------------------------------------------------ actions

/// Runs an action's use case for a visitor who passed the CSRF check;
/// a refusal shows its reason, success goes back to `back`.
async fn act<F, Fut>(c: &Console, headers: &HeaderMap, csrf: &str, back: String, f: F) -> Response
where
    F: FnOnce(Broker, Caller) -> Fut,
    Fut: std::future::Future<Output = Result<String, BrokerError>>,
{
    let visitor = match c.actor(headers, csrf).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let principal = visitor.caller.principal.clone();
    match f(c.broker.clone(), visitor.caller.clone()).await {
        Ok(to) => {
            tracing::info!(%principal, to = %to, "console action");
            see_other(if to.is_empty() { &back } else { &to })
        }
        Err(e) => error_response(Some(&visitor), &e),
    }
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn cancel(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    Form(form): Form<CancelForm>,
) -> Response {
    let back = format!("/runs/{}", view::path_segment(&run_id));
    act(
        &c,
        &headers,
        &form.csrf,
        back,
        |broker, caller| async move {
            let reason = match form.reason.trim() {
                "" => format!("cancelled in the console by {}", caller.principal),
                r => r.to_string(),
            };
            crate::app::runs::cancel(&broker, &caller, pb::CancelRunRequest { run_id, reason })
                .await?;
            Ok(String::new())
        },
    )
    .await
}

async fn answer(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((run_id, request_id)): Path<(String, String)>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let csrf = form
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let back = format!("/runs/{}", view::path_segment(&run_id));
    act(&c, &headers, &csrf, back, |broker, caller| async move {
        let run = crate::app::access::read(&broker, &caller, &run_id, "").await?;
        let request = run
            .waiting
            .iter()
            .find(|r| r.id == request_id)
            .cloned()
            .ok_or_else(|| BrokerError::InputNotFound(request_id.clone()))?;
        let answer = json::answer_from_form(&broker, &request, &form)?;
        crate::app::input::provide_input(
            &broker,
            &caller,
            pb::ProvideInputRequest {
                run_id,
                request_id,
                answer: Some(answer),
            },
        )
        .await?;
        Ok(String::new())
    })
    .await
}

#[derive(Deserialize)]
struct ForkForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    payload: String,
}

async fn fork(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    Form(form): Form<ForkForm>,
) -> Response {
    let back = format!("/runs/{}", view::path_segment(&run_id));
    act(
        &c,
        &headers,
        &form.csrf,
        back,
        |broker, caller| async move {
            // Who may, before the form is read (a refused caller learns
            // nothing of the agent it names).
            let run = crate::app::access::read(&broker, &caller, &run_id, "").await?;
            if !caller.may(Action::Own, &run.owner) {
                return Err(crate::app::access::hidden(&broker, &caller, &run).await);
            }
            let agent = form.agent.trim().to_string();
            crate::rules::names::validate("agent", &agent)?;
            let payload = json::payload_for_agent(&broker, &agent, &form.payload).await?;
            let forked = crate::app::fork::fork(
                &broker,
                &caller,
                pb::ForkRunRequest {
                    run_id,
                    at_revision: form.revision,
                    handoff: Some(pb::HandoffRequest {
                        target_agent: agent,
                        payload: Some(payload),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await?;
            let new_id = forked.run.map(|r| r.id).unwrap_or_default();
            Ok(format!("/runs/{}", view::path_segment(&new_id)))
        },
    )
    .await
}

#[derive(Deserialize)]
struct RedriveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    to_agent: String,
    #[serde(default)]
    back: String,
}

async fn redrive(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(sequence): Path<u64>,
    Form(form): Form<RedriveForm>,
) -> Response {
    // Back to a page of this console only (no `//host`, no `/\host`).
    let local = form.back.starts_with('/')
        && !form.back[1..].starts_with(['/', '\\'])
        && !form.back.contains('\\')
        && !form.back.chars().any(char::is_control);
    let back = if local {
        form.back.clone()
    } else {
        "/".to_string()
    };
    act(
        &c,
        &headers,
        &form.csrf,
        back,
        |broker, caller| async move {
            crate::app::redrive::redrive(
                &broker,
                &caller,
                pb::RedriveDeadLetterRequest {
                    sequence,
                    to_agent: form.to_agent.trim().to_string(),
                },
            )
            .await?;
            Ok(String::new())
        },
    )
    .await
}

// ------------------------------------------------------------ live

#[derive(Deserialize)]
struct LiveQuery {
    #[serde(default)]
    run: String,
}

/// Server-Sent Events: one `changed` event (its data the run id and the
/// event kind) for each stored event the visitor may see: of one run
/// (`?run=`), checked like `Watch`, or of every run it may read.
async fn live(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<LiveQuery>,
) -> Response {
    let visitor = match c.visitor(&headers).await {
        Ok(v) => v,
        Err(Refused::SignIn) => return StatusCode::UNAUTHORIZED.into_response(),
        Err(r) => return r.into_response(),
    };
    let caller = visitor.caller.clone();
    let stream = if q.run.is_empty() {
        match c.broker.store().watch_events(None, None, 0).await {
            Ok(events) => events
                .filter(move |e| {
                    let keep = match e {
                        // Events of no run's owner (access_denied, contract
                        // changes) only with read, as Watch.
                        Ok(e) => {
                            caller.may(Action::Read, "")
                                || (!e.owner.is_empty() && caller.may(Action::Own, &e.owner))
                        }
                        Err(_) => false,
                    };
                    std::future::ready(keep)
                })
                .boxed(),
            Err(e) => return error_response(Some(&visitor), &e),
        }
    } else {
        let req = pb::WatchRequest {
            run_id: q.run.clone(),
            ..Default::default()
        };
        match crate::app::events::watch(&c.broker, &caller, req).await {
            Ok((events, _)) => events,
            Err(e) => return error_response(Some(&visitor), &e),
        }
    };
    // The stream ends once the session does (signed out, expired, its
    // token revoked) or the visitor may no longer read the run; checked
    // every LIVE_CHECK.
    let ended = {
        let (c, headers, run) = (c.clone(), headers.clone(), q.run.clone());
        let caller = visitor.caller.clone();
        async move {
            loop {
                tokio::time::sleep(LIVE_CHECK).await;
                if !c.still_signed_in(&headers).await {
                    return;
                }
                if !run.is_empty() {
                    let readable = crate::app::access::read(&c.broker, &caller, &run, "").await;
                    if matches!(&readable, Err(e) if matches!(e.class(), crate::error::Class::NotFound | crate::error::Class::PermissionDenied))
                    {
                        return;
                    }
                }
            }
        }
    };
    let stream = stream.take_until(Box::pin(ended));
    let events = stream.map(|e| {
        let data = match e {
            Ok(e) => format!(
                "{} {} {}",
                e.run_id,
                crate::app::events::kind_token(e.kind),
                e.sequence
            ),
            Err(_) => "error".to_string(),
        };
        Ok::<_, std::convert::Infallible>(SseEvent::default().event("changed").data(data))
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    secure_headers(&mut resp);
    resp
}

// ------------------------------------------------------------ assets

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}
