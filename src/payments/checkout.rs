//! Stripe's `POST /v1/checkout/sessions`, called when an admin or a key
//! asks for a checkout: form-encoded, the secret key as Bearer, an
//! `Idempotency-Key` so a retry of ours makes no second session.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Longest wait for Stripe's answer.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Largest answer read (a session object is a few KB).
const ANSWER_MAX: usize = 1024 * 1024;

/// A created session: what the payer's browser is sent to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// `cs_…`
    pub id: String,
    /// Stripe's hosted payment page.
    pub url: String,
}

fn bad_gateway(message: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::upstream(StatusCode::BAD_GATEWAY, message)
}

/// Creates a Checkout Session at `api_base` with the form `pairs`.
pub async fn create_session(
    api_base: &str,
    secret_key: &str,
    pairs: &[(String, String)],
    idempotency_key: &str,
) -> Result<Session, ApiError> {
    let uri = format!("{}/v1/checkout/sessions", api_base.trim_end_matches('/'));
    let req = http::Request::post(&uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {secret_key}"))
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header("idempotency-key", idempotency_key)
        .body(Full::new(Bytes::from(super::stripe::form(pairs))))
        .map_err(|e| ApiError::internal(format!("payments.stripe.api_base {api_base:?}: {e}")))?;
    // One client per checkout: they are rare, and a pooled client would
    // tie its connections to the runtime of the first caller.
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let res = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| bad_gateway("Stripe did not answer in time; no checkout was made."))?
        .map_err(|e| {
            tracing::warn!(error = %e, "stripe checkout request failed");
            bad_gateway("Stripe could not be reached; no checkout was made.")
        })?;
    let status = res.status();
    let body = tokio::time::timeout(TIMEOUT, Limited::new(res.into_body(), ANSWER_MAX).collect())
        .await
        .map_err(|_| bad_gateway("Stripe's answer stalled."))?
        .map_err(|_| bad_gateway("Stripe's answer could not be read."))?
        .to_bytes();
    if !status.is_success() {
        #[derive(Deserialize)]
        struct Err {
            error: Option<ErrBody>,
        }
        #[derive(Deserialize)]
        struct ErrBody {
            message: Option<String>,
        }
        let message = serde_json::from_slice::<Err>(&body)
            .ok()
            .and_then(|e| e.error?.message)
            .unwrap_or_default();
        tracing::warn!(status = %status, message = %message, "stripe refused a checkout");
        return Err(bad_gateway(format!(
            "Stripe refused the checkout ({status}): {}",
            crate::error::truncate(&message, 300)
        )));
    }
    serde_json::from_slice::<Session>(&body)
        .map_err(|_| bad_gateway("Stripe's answer has no session id and url."))
}
