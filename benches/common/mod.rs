//! What the end-to-end benches share: a gateway (per-core, one worker) in
//! front of the in-process mock upstream, a client, and a key made through
//! the admin API as a user would.
#![allow(dead_code)]

use std::path::PathBuf;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate::config::Config;
use tollgate::runtime::{Gateway, StartOptions};
use tollgate::store::KeyHash;
use tollgate_mock::{MockOptions, MockUpstream};

pub const ADMIN: &str = "bench-admin-token-0123456789";
const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[runtime]
mode = "per-core"
workers = 1
[storage]
path = "{DATA}"
flush_ms = 50
[[upstreams]]
name = "mock"
base_url = "{MOCK}"
api_key_env = "TOLLGATE_BENCH_UPSTREAM_KEY"
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
max_output_tokens = 256
"#;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub struct BenchGateway {
    pub mock: MockUpstream,
    pub gw: Gateway,
    pub rt: tokio::runtime::Runtime,
    pub client: HttpClient,
    data: PathBuf,
}

impl BenchGateway {
    /// Starts the mock and the gateway; `tag` names the temp storage dir.
    pub fn start(tag: &str) -> BenchGateway {
        // SAFETY: set once, before the gateway (the only reader) starts and
        // before any other thread of this process exists.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(UPSTREAM_KEY_ENV, "sk-bench-upstream")
        };
        let mock = MockUpstream::start(MockOptions::default()).expect("mock starts");
        let data =
            std::env::temp_dir().join(format!("tollgate-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let text = CONFIG
            .replace("{DATA}", &data.display().to_string())
            .replace("{MOCK}", &mock.base_url());
        let config = Config::parse(&text, "bench.toml").expect("bench config parses");
        let gw = Gateway::start(
            config,
            StartOptions {
                admin_token: Some(ADMIN.to_owned()),
                ..StartOptions::default()
            },
        )
        .expect("gateway starts");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current_thread runtime builds");
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        BenchGateway {
            mock,
            gw,
            rt,
            client,
            data,
        }
    }

    /// An unlimited key: (key, hash).
    pub fn create_key(&self) -> (String, KeyHash) {
        self.rt.block_on(async {
            let req = Request::post(format!("http://{}/api/v1/keys", self.gw.addr()))
                .header("authorization", format!("Bearer {ADMIN}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"name\":\"bench\"}")))
                .expect("request builds");
            let res = self.client.request(req).await.expect("create key");
            assert_eq!(res.status(), 201);
            let body = res.into_body().collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            let hash: KeyHash = hex::decode(v["data"]["hash"].as_str().expect("hash"))
                .expect("hex")
                .try_into()
                .expect("32 bytes");
            (v["key"].as_str().expect("key").to_owned(), hash)
        })
    }

    /// Drains and stops the gateway, then removes its storage.
    pub fn finish(self) {
        let BenchGateway {
            mock,
            gw,
            rt,
            client,
            data,
        } = self;
        drop(client);
        drop(rt);
        gw.shutdown();
        drop(mock);
        let _ = std::fs::remove_dir_all(&data);
    }
}
