//! A webhook receiver on 127.0.0.1 and the check a receiver makes of a
//! delivery (Standard Webhooks), for the events and cluster tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use sha2::Sha256;

/// The Standard Webhooks test vector's secret: what the gateways under
/// test sign with (`TOLLGATE_TEST_HOOK_SECRET`).
pub const HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The signature a receiver computes, the test vector's way.
pub fn expected_signature(id: &str, ts: &str, body: &[u8]) -> String {
    let key = STANDARD
        .decode(HOOK_SECRET.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// One request a receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub ts: String,
    pub sig: String,
    pub body: Bytes,
    /// What it was answered.
    pub code: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Got {
    pub fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The status to answer `(webhook-id, nth try of that id)` with.
pub type Answer = Arc<dyn Fn(&str, usize) -> u16 + Send + Sync>;

/// [`Answer`] with how long to hold the try before answering.
pub type SlowAnswer = Arc<dyn Fn(&str, usize) -> (u16, Duration) + Send + Sync>;

/// A webhook receiver on 127.0.0.1: answers each try as told.
pub struct Hook {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Hook {
    pub async fn start(answer: Answer) -> Hook {
        Hook::start_slow(Arc::new(move |id, n| (answer(id, n), Duration::ZERO))).await
    }

    /// A receiver that may hold a try (a node killed meanwhile never
    /// learns its outcome).
    pub async fn start_slow(answer: SlowAnswer) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let tries: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (g, tries, answer) = (g.clone(), tries.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (g, tries, answer) = (g.clone(), tries.clone(), answer.clone());
                            async move {
                                let h = |n: &str| {
                                    req.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned()
                                };
                                let (id, ts, sig) = (
                                    h("webhook-id"),
                                    h("webhook-timestamp"),
                                    h("webhook-signature"),
                                );
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let n = {
                                    let mut t = tries.lock().expect("tries");
                                    let n = t.entry(id.clone()).or_insert(0);
                                    *n += 1;
                                    *n
                                };
                                let (code, hold) = answer(&id, n);
                                g.lock().expect("got").push(Got {
                                    id,
                                    ts,
                                    sig,
                                    body,
                                    code,
                                    at: Instant::now(),
                                });
                                if !hold.is_zero() {
                                    tokio::time::sleep(hold).await;
                                }
                                let mut res = http::Response::new(Full::new(Bytes::new()));
                                *res.status_mut() =
                                    http::StatusCode::from_u16(code).expect("a status");
                                Ok::<_, std::convert::Infallible>(res)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Hook { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().expect("got").clone()
    }

    /// The tries for events of `kind`.
    pub fn of(&self, kind: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.event()["type"] == kind)
            .collect()
    }
}
