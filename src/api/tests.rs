//! The pure parts (routing, parsing, validation) one by one, then whole
//! requests in-process against a real store and gate.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::keys::{apply_patch, check_import_key, new_record, parse_spec};
use super::*;
use crate::clock::Period;
use crate::config::{Dur, PlanConfig};
use crate::money::Pico;

fn fields(text: &str) -> Fields {
    Fields::parse(text.as_bytes()).expect("test bodies are JSON objects")
}

fn param_of(e: &ApiError) -> Option<&str> {
    e.param.as_deref()
}

#[test]
fn routes() {
    let h = "a".repeat(64);
    assert_eq!(call_of("/api/v1/keys"), Some(AdminCall::Keys));
    assert_eq!(call_of("/api/v1/keys/import"), Some(AdminCall::Import));
    assert_eq!(
        call_of(&format!("/api/v1/keys/{h}")),
        Some(AdminCall::Key(&h))
    );
    assert_eq!(
        call_of(&format!("/api/v1/keys/{h}/credits")),
        Some(AdminCall::Credits(&h))
    );
    assert_eq!(
        call_of(&format!("/api/v1/keys/{h}/ledger")),
        Some(AdminCall::Ledger(&h))
    );
    assert_eq!(call_of("/api/v1/key"), Some(AdminCall::OwnKey));
    assert_eq!(call_of("/api/v1/auth/key"), Some(AdminCall::OwnKey));
    assert_eq!(call_of(&format!("/api/v1/keys/{h}/other")), None);
    assert_eq!(call_of("/api/v1/keys/a/b/c/d"), None);
    assert_eq!(call_of("/api/v2/keys"), None);
    assert_eq!(call_of("/api/usage"), None);
}

#[test]
fn hashes_are_64_lowercase_hex() {
    let ok = "0123456789abcdef".repeat(4);
    assert_eq!(parse_hash(&ok).unwrap()[0], 0x01);
    for bad in [
        "".to_owned(),
        "abc".to_owned(),
        ok.to_uppercase(),
        format!("{ok}0"),
        ok[..63].to_owned(),
        "..%2F..%2Fetc%2Fpasswd".to_owned(),
        format!("..%2F{}", &ok[..59]),
        "g".repeat(64),
    ] {
        let e = parse_hash(&bad).unwrap_err();
        assert_eq!(e.status, 400, "{bad}");
        assert_eq!(e.code, "invalid_hash");
    }
}

#[test]
fn token_compare() {
    assert!(token_matches(b"secret-token", b"secret-token"));
    assert!(!token_matches(b"secret-token", b"secret-tokeN"));
    assert!(!token_matches(b"secret-token", b"secret-token-longer"));
    assert!(!token_matches(b"secret-token", b""));
    assert!(!token_matches(b"", b""));
}

#[test]
fn bodies_must_be_objects_without_duplicates() {
    assert_eq!(Fields::parse(b"[1]").unwrap_err().code, "invalid_json");
    assert_eq!(Fields::parse(b"").unwrap_err().code, "invalid_json");
    assert_eq!(Fields::parse(b"{\"a\":").unwrap_err().code, "invalid_json");
    let e = Fields::parse(br#"{"name":"a","name":"b"}"#).unwrap_err();
    assert_eq!((e.code, param_of(&e)), ("duplicate_field", Some("name")));
    let e = fields(r#"{"name":"a","lmit":1}"#)
        .only(&["name", "limit"])
        .unwrap_err();
    assert_eq!((e.code, param_of(&e)), ("unknown_field", Some("lmit")));
}

#[test]
fn create_bodies() {
    let s = parse_spec(
        &fields(
            r#"{"name":"n","limit":0.1,"daily_fee":"0.000000000001","limit_reset":"weekly",
                "expires_at":"2030-01-01T00:00:00Z","rpm":5,"models":["gpt-*"],
                "allowed_ips":["10.1.2.3/8","192.0.2.7"],"metadata":{"a":[1,2.50]}}"#,
        ),
        true,
    )
    .unwrap();
    assert_eq!(s.name.as_deref(), Some("n"));
    assert_eq!(s.limit, Patch::Set(Pico(100_000_000_000)));
    assert_eq!(s.daily_fee, Patch::Set(Pico(1)));
    assert_eq!(s.limit_reset, Patch::Set(Period::Weekly));
    assert_eq!(s.expires_at, Patch::Set(1_893_456_000_000));
    assert_eq!(s.rpm, Patch::Set(5));
    assert_eq!(
        s.allowed_ips,
        Patch::Set(vec!["10.0.0.0/8".to_owned(), "192.0.2.7/32".to_owned()])
    );
    assert_eq!(s.metadata, Patch::Set(r#"{"a":[1,2.50]}"#.to_owned()));

    let cases: &[(&str, &str, &str)] = &[
        (r#"{}"#, "name", "missing_field"),
        (r#"{"name":5}"#, "name", "invalid_type"),
        (r#"{"name":""}"#, "name", "invalid_value"),
        (r#"{"name":null}"#, "name", "invalid_type"),
        (r#"{"name":"n","limit":-1}"#, "limit", "invalid_amount"),
        (
            r#"{"name":"n","limit":"1000000.000000000001"}"#,
            "limit",
            "invalid_amount",
        ),
        (r#"{"name":"n","limit":1e-13}"#, "limit", "invalid_amount"),
        (r#"{"name":"n","limit":true}"#, "limit", "invalid_amount"),
        (r#"{"name":"n","limit":"abc"}"#, "limit", "invalid_amount"),
        (
            r#"{"name":"n","daily_fee":-0.5}"#,
            "daily_fee",
            "invalid_amount",
        ),
        (
            r#"{"name":"n","limit_reset":"hourly"}"#,
            "limit_reset",
            "invalid_type",
        ),
        (
            r#"{"name":"n","expires_at":"tomorrow"}"#,
            "expires_at",
            "invalid_date",
        ),
        (
            r#"{"name":"n","expires_at":12345}"#,
            "expires_at",
            "invalid_type",
        ),
        (r#"{"name":"n","rpm":0}"#, "rpm", "invalid_value"),
        (r#"{"name":"n","tpm":0}"#, "tpm", "invalid_value"),
        (
            r#"{"name":"n","concurrency":0}"#,
            "concurrency",
            "invalid_value",
        ),
        (r#"{"name":"n","rpm":-1}"#, "rpm", "invalid_type"),
        (r#"{"name":"n","rpm":4294967296}"#, "rpm", "invalid_type"),
        (
            r#"{"name":"n","models":["gpt-[4"]}"#,
            "models",
            "invalid_pattern",
        ),
        (r#"{"name":"n","models":"gpt-4"}"#, "models", "invalid_type"),
        (
            r#"{"name":"n","allowed_ips":["10.0.0.0/33"]}"#,
            "allowed_ips",
            "invalid_cidr",
        ),
        (
            r#"{"name":"n","allowed_ips":["example.com"]}"#,
            "allowed_ips",
            "invalid_cidr",
        ),
        (r#"{"name":"n","metadata":[1]}"#, "metadata", "invalid_type"),
        (r#"{"name":"n","owner":""}"#, "owner", "invalid_value"),
        (r#"{"name":"n","plan":7}"#, "plan", "invalid_type"),
        (r#"{"name":"n","hash":"x"}"#, "hash", "unknown_field"),
        (
            r#"{"name":"n","disabled":"yes"}"#,
            "disabled",
            "invalid_type",
        ),
    ];
    for (body, param, code) in cases {
        let e = parse_spec(&fields(body), true).unwrap_err();
        assert_eq!(e.status, 400, "{body}");
        assert_eq!((e.code, param_of(&e)), (*code, Some(*param)), "{body}: {e}");
    }
    let long = format!(r#"{{"name":"{}"}}"#, "é".repeat(257));
    assert_eq!(
        param_of(&parse_spec(&fields(&long), true).unwrap_err()),
        Some("name")
    );
    assert!(
        parse_spec(
            &fields(&format!(r#"{{"name":"{}"}}"#, "é".repeat(256))),
            true
        )
        .is_ok()
    );
    let big = format!(
        r#"{{"name":"n","metadata":{{"a":"{}"}}}}"#,
        "x".repeat(16 * 1024)
    );
    assert_eq!(
        param_of(&parse_spec(&fields(&big), true).unwrap_err()),
        Some("metadata")
    );
    let owner = format!(r#"{{"name":"n","owner":"{}"}}"#, "o".repeat(257));
    assert_eq!(
        param_of(&parse_spec(&fields(&owner), true).unwrap_err()),
        Some("owner")
    );
}

#[test]
fn patch_bodies_null_versus_absent() {
    // plan and owner are create-only.
    let e = parse_spec(&fields(r#"{"plan":"x"}"#), false).unwrap_err();
    assert_eq!((e.code, param_of(&e)), ("unknown_field", Some("plan")));
    let s = parse_spec(&fields(r#"{"limit":null,"rpm":7,"models":null}"#), false).unwrap();
    assert_eq!(s.name, None);
    assert_eq!(s.limit, Patch::Null);
    assert_eq!(s.rpm, Patch::Set(7));
    assert_eq!(s.tpm, Patch::Absent);
    assert_eq!(s.models, Patch::Null);

    let (mut rec, _) = new_record(
        parse_spec(
            &fields(r#"{"name":"a","tpm":100,"rpm":1,"models":["x"],"metadata":{"k":1}}"#),
            true,
        )
        .unwrap(),
        None,
        [7; 32],
        "l".into(),
        1000,
    )
    .unwrap();
    let limit = apply_patch(s, &mut rec, 2000);
    assert_eq!(limit, Patch::Null);
    assert_eq!(rec.rpm, Some(7));
    assert_eq!(rec.tpm, Some(100), "absent leaves it");
    assert!(rec.models.is_empty(), "null clears it");
    assert_eq!(rec.metadata.as_deref(), Some(r#"{"k":1}"#));
    assert_eq!(rec.name, "a");
    assert_eq!(rec.updated_at, 2000);
    assert_eq!(rec.created_at, 1000);
}

#[test]
fn plans_fill_what_is_unset() {
    let plan = PlanConfig {
        limit: Some(Pico(100_000_000)),
        expires_in: Some(Dur::secs(7 * 86_400)),
        max_requests: Some(50),
        rpm: Some(10),
        models: vec!["demo-*".into()],
        ..Default::default()
    };
    let spec = parse_spec(
        &fields(r#"{"name":"t","plan":"trial","rpm":null,"max_requests":3}"#),
        true,
    )
    .unwrap();
    let (rec, limit) = new_record(spec, Some(&plan), [1; 32], "l".into(), 1_000).unwrap();
    assert_eq!(limit, Some(Pico(100_000_000)));
    assert_eq!(rec.expires_at, Some(1_000 + 7 * 86_400_000));
    assert_eq!(rec.max_requests, Some(3), "set in the body wins");
    assert_eq!(rec.rpm, None, "null in the body wins");
    assert_eq!(rec.models, vec!["demo-*"]);
    assert_eq!(rec.plan.as_deref(), Some("trial"));
    let past = parse_spec(
        &fields(r#"{"name":"t","expires_at":"2000-01-01T00:00:00Z"}"#),
        true,
    )
    .unwrap();
    let e = new_record(past, None, [1; 32], "l".into(), 1_000_000_000_000).unwrap_err();
    assert_eq!(param_of(&e), Some("expires_at"));
}

#[test]
fn import_key_format() {
    let ok = format!("sk-{}", "aZ09".repeat(12));
    assert!(check_import_key(&ok, "sk-", 48).is_ok());
    for bad in [
        format!("sk-{}", "a".repeat(47)),
        format!("sk-{}", "a".repeat(49)),
        format!("pk-{}", "a".repeat(48)),
        format!("sk-{}-", "a".repeat(47)),
        format!("sk-{}é", "a".repeat(46)),
        "".to_owned(),
    ] {
        let e = check_import_key(&bad, "sk-", 48).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code),
            (400, "invalid_key_format"),
            "{bad}"
        );
    }
}

#[test]
fn queries_and_pages() {
    let p = query_pairs(Some("owner=a%40b.c+d&limit=5&x")).unwrap();
    assert_eq!(p[0], ("owner".to_owned(), "a@b.c d".to_owned()));
    assert_eq!(offset_limit(&p).unwrap(), (0, 5));
    assert_eq!(offset_limit(&[]).unwrap(), (0, 100));
    for bad in ["limit=0", "limit=1001", "limit=-1", "offset=x", "limit=1e3"] {
        let p = query_pairs(Some(bad)).unwrap();
        assert_eq!(offset_limit(&p).unwrap_err().status, 400, "{bad}");
    }
    assert!(query_pairs(Some("owner=%ff")).is_err());
    assert!(query_pairs(Some("owner=%4")).is_err());
}

// ---- whole requests, in-process ----

struct World {
    config: Config,
    gate: Gate,
    store: Store,
    clock: Clock,
    token: String,
    admin_guard: AdminGuard,
    /// Scoped admin tokens (none: these tests use the root token).
    admin_tokens: AdminTokens,
    dir: PathBuf,
}

impl World {
    fn new() -> World {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-api-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, 2).expect("a fresh store opens");
        let clock = Clock::system();
        let mut config = Config::default();
        config.plans.insert(
            "trial".into(),
            PlanConfig {
                limit: Some(Pico(100_000_000)),
                expires_in: Some(Dur::secs(7 * 86_400)),
                max_requests: Some(50),
                one_per_owner: true,
                ..Default::default()
            },
        );
        World {
            gate: Gate::new(store.clone(), clock.clone(), 60),
            config,
            store,
            clock,
            token: "admin-secret".into(),
            admin_guard: AdminGuard::new(3),
            admin_tokens: AdminTokens::default(),
            dir,
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            config: &self.config,
            gate: &self.gate,
            store: &self.store,
            clock: &self.clock,
            admin_token: &self.token,
            admin_guard: &self.admin_guard,
            events: None,
            admin_tokens: &self.admin_tokens,
            caller: None,
            app: None,
        }
    }

    /// (status, body text, body JSON)
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String, Value) {
        let auth = format!("Bearer {}", self.token);
        self.call_as(method, path, body, Some(&auth), [127, 0, 0, 1])
            .await
    }

    async fn call_as(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: Option<&str>,
        ip: [u8; 4],
    ) -> (u16, String, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let res = serve(&self.ctx(), req, IpAddr::V4(Ipv4Addr::from(ip))).await;
        let status = res.status().as_u16();
        if status != 204 {
            assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, text, v)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn key_lifecycle() {
    let w = World::new();
    let (s, text, v) = w
        .call(
            "POST",
            "/api/v1/keys",
            Some(r#"{"name":"alice","limit":"0.3","owner":"alice@x","metadata":{"tier":"gold"}}"#),
        )
        .await;
    assert_eq!(s, 201, "{text}");
    let key = v["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-tg-") && key.len() == 54);
    let hash = v["data"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash, hex::encode(crate::gate::hash_key(&key)));
    assert!(text.contains(r#""limit":0.3,"#), "{text}");
    assert!(text.contains(r#""limit_remaining":0.3,"#), "{text}");
    assert!(text.contains(r#""usage":0,"#), "{text}");
    assert_eq!(v["data"]["metadata"]["tier"], "gold");
    assert_eq!(v["data"]["label"], crate::gate::label_of(&key));
    assert_eq!(v["data"]["imported"], false);

    let (s, _, v) = w.call("GET", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["data"]["name"], "alice");
    assert!(v.get("key").is_none() && v["data"].get("key").is_none());

    let (s, _, v) = w.call("GET", "/api/v1/keys?owner=alice%40x", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 1);

    let (s, text, v) = w
        .call(
            "PATCH",
            &format!("/api/v1/keys/{hash}"),
            Some(r#"{"name":"bob","limit":null,"rpm":3,"metadata":null}"#),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["data"]["name"], "bob");
    assert_eq!(v["data"]["limit"], Value::Null);
    assert_eq!(v["data"]["rpm"], 3);
    assert_eq!(v["data"]["metadata"], Value::Null);
    let (_, _, v) = w.call("GET", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(v["data"]["limit"], Value::Null);
    assert_eq!(v["data"]["owner"], "alice@x");

    // A refused patch changes nothing.
    let (s, _, v) = w
        .call(
            "PATCH",
            &format!("/api/v1/keys/{hash}"),
            Some(r#"{"name":"carol","rpm":0}"#),
        )
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("rpm")));
    let (_, _, v) = w.call("GET", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(v["data"]["name"], "bob");

    // The key's own status.
    let (s, text, v) = w
        .call_as(
            "GET",
            "/api/v1/key",
            None,
            Some(&format!("Bearer {key}")),
            [127, 0, 0, 1],
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["data"]["rate_limit"]["requests"], 3);
    assert_eq!(v["data"]["is_free_tier"], false);

    let (s, _, v) = w
        .call("DELETE", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!((s, v["deleted"].as_bool()), (200, Some(true)));
    let (s, _, _) = w.call("GET", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(s, 404);
    let (s, _, _) = w
        .call("DELETE", &format!("/api/v1/keys/{hash}"), None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn credits_and_ledger() {
    let w = World::new();
    let (_, _, v) = w
        .call("POST", "/api/v1/keys", Some(r#"{"name":"k","limit":1}"#))
        .await;
    let hash = v["data"]["hash"].as_str().unwrap().to_owned();
    let credits = format!("/api/v1/keys/{hash}/credits");

    let (s, text, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":"0.5","kind":"topup","reason":"paid","idempotency_key":"t1"}"#),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert!(text.contains(r#""limit":1.5,"#), "{text}");
    assert_eq!(v["data"]["replayed"], false);
    let (_, text, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":"0.5","kind":"topup","reason":"paid","idempotency_key":"t1"}"#),
        )
        .await;
    assert_eq!(v["data"]["replayed"], true);
    assert!(
        text.contains(r#""limit":1.5,"#),
        "replay must not top up twice: {text}"
    );
    // Same idempotency key, different request.
    let (s, _, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":"0.7","kind":"topup","reason":"paid","idempotency_key":"t1"}"#),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );

    let (s, text, _) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":0.25,"kind":"deduct","reason":"manual","idempotency_key":"d1"}"#),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert!(text.contains(r#""usage":0.25,"#), "{text}");
    assert!(text.contains(r#""limit_remaining":1.25,"#), "{text}");

    // Beyond what remains: 402, nothing changes.
    let (s, _, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":2,"kind":"deduct","reason":"too much"}"#),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (402, Some("insufficient_quota"))
    );
    let (_, text, _) = w.call("GET", &format!("/api/v1/keys/{hash}"), None).await;
    assert!(text.contains(r#""usage":0.25,"#), "{text}");
    assert!(text.contains(r#""limit_remaining":1.25,"#), "{text}");

    // Drain the key, then replay d1: still the first answer, not a 402.
    let (s, _, _) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":1.25,"kind":"deduct","reason":"drain"}"#),
        )
        .await;
    assert_eq!(s, 200);
    let (s, text, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":0.25,"kind":"deduct","reason":"manual","idempotency_key":"d1"}"#),
        )
        .await;
    assert_eq!(
        (s, v["data"]["replayed"].as_bool()),
        (200, Some(true)),
        "{text}"
    );

    let (s, text, _) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":"0.5","kind":"refund","reason":"sorry","idempotency_key":"r1"}"#),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert!(text.contains(r#""usage":1,"#), "{text}");
    assert!(text.contains(r#""limit_remaining":0.5,"#), "{text}");
    let (s, _, v) = w
        .call(
            "POST",
            &credits,
            Some(r#"{"amount":"5","kind":"refund","reason":"too much"}"#),
        )
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("amount")));

    for (body, param) in [
        (r#"{"amount":0,"kind":"topup","reason":"x"}"#, "amount"),
        (r#"{"amount":-1,"kind":"topup","reason":"x"}"#, "amount"),
        (r#"{"amount":1,"kind":"gift","reason":"x"}"#, "kind"),
        (r#"{"amount":1,"kind":"daily_fee","reason":"x"}"#, "kind"),
        (r#"{"amount":1,"kind":"topup"}"#, "reason"),
        (r#"{"kind":"topup","reason":"x"}"#, "amount"),
        (
            r#"{"amount":1,"kind":"topup","reason":"x","extra":1}"#,
            "extra",
        ),
    ] {
        let (s, _, v) = w.call("POST", &credits, Some(body)).await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}"
        );
    }

    let (s, _, v) = w
        .call("GET", &format!("/api/v1/keys/{hash}/ledger?limit=2"), None)
        .await;
    assert_eq!(s, 200);
    let entries = v["data"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "refund");
    assert_eq!(entries[1]["kind"], "deduct");
    let (_, _, v) = w
        .call("GET", &format!("/api/v1/keys/{hash}/ledger"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 4);
    let unknown = "0".repeat(64);
    let (s, _, _) = w
        .call(
            "POST",
            &format!("/api/v1/keys/{unknown}/credits"),
            Some(r#"{"amount":1,"kind":"topup","reason":"x"}"#),
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn plans_one_per_owner_and_import() {
    let w = World::new();
    let (s, _, v) = w
        .call(
            "POST",
            "/api/v1/keys",
            Some(r#"{"name":"t","plan":"trial"}"#),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("owner_required"))
    );
    let (s, text, v) = w
        .call(
            "POST",
            "/api/v1/keys",
            Some(r#"{"name":"t","plan":"trial","owner":"o1"}"#),
        )
        .await;
    assert_eq!(s, 201, "{text}");
    assert!(text.contains(r#""limit":0.0001,"#), "{text}");
    assert_eq!(v["data"]["max_requests"], 50);
    assert!(v["data"]["expires_at"].is_string());
    let first = v["data"]["hash"].as_str().unwrap().to_owned();
    let key = v["key"].as_str().unwrap().to_owned();
    let (s, _, v) = w
        .call(
            "POST",
            "/api/v1/keys",
            Some(r#"{"name":"t2","plan":"trial","owner":"o1"}"#),
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(v["error"]["metadata"]["hash"], first.as_str());
    let (s, _, v) = w
        .call(
            "POST",
            "/api/v1/keys",
            Some(r#"{"name":"t","plan":"gold"}"#),
        )
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("plan")));
    let (_, _, v) = w
        .call_as(
            "GET",
            "/api/v1/auth/key",
            None,
            Some(&format!("Bearer {key}")),
            [127, 0, 0, 1],
        )
        .await;
    assert_eq!(v["data"]["is_free_tier"], true);

    let imported = format!("sk-{}", "Ab1".repeat(16));
    let body = format!(r#"{{"key":"{imported}","owner":"o2","unlimited":true}}"#);
    let (s, text, v) = w.call("POST", "/api/v1/keys/import", Some(&body)).await;
    assert_eq!(s, 201, "{text}");
    assert!(v.get("key").is_none());
    assert_eq!(v["data"]["imported"], true);
    assert_eq!(v["data"]["limit"], Value::Null);
    let (s, _, v2) = w.call("POST", "/api/v1/keys/import", Some(&body)).await;
    assert_eq!(s, 200);
    assert_eq!(v2["data"]["hash"], v["data"]["hash"]);
    let other = format!(r#"{{"key":"{imported}","owner":"o3"}}"#);
    let (s, _, _) = w.call("POST", "/api/v1/keys/import", Some(&other)).await;
    assert_eq!(s, 409);
    let bad = r#"{"key":"sk-short","owner":"o2"}"#;
    let (s, _, v) = w.call("POST", "/api/v1/keys/import", Some(bad)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_key_format"))
    );
    // Without a plan and without `unlimited`, an import starts at 0.
    let zero = format!(r#"{{"key":"sk-{}","owner":"o4"}}"#, "z".repeat(48));
    let (s, text, _) = w.call("POST", "/api/v1/keys/import", Some(&zero)).await;
    assert_eq!(s, 201);
    assert!(text.contains(r#""limit":0,"#), "{text}");
}

#[tokio::test]
async fn auth_paths_methods_and_sizes() {
    let w = World::new();
    let ip = [10, 0, 0, 9];
    let (s, _, v) = w.call_as("GET", "/api/v1/keys", None, None, ip).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (s, _, _) = w
        .call_as("GET", "/api/v1/keys", None, Some("Bearer wrong"), ip)
        .await;
    assert_eq!(s, 401);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            w.call_as("GET", "/api/v1/keys", None, Some("Bearer wrong"), ip)
                .await
                .0,
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // Blocked before comparing: even the right token is refused (item 16).
    let right = format!("Bearer {}", w.token);
    let (s, _, v) = w
        .call_as("GET", "/api/v1/keys", None, Some(&right), ip)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded"))
    );
    // Another IP is not blocked, and the right token works.
    let (s, _, _) = w.call("GET", "/api/v1/keys", None).await;
    assert_eq!(s, 200);
    // The block ends with time (the test clock, moved).
    w.clock.advance(std::time::Duration::from_millis(
        admin_guard::BLOCK_MS as u64,
    ));
    let (s, _, _) = w
        .call_as("GET", "/api/v1/keys", None, Some(&right), ip)
        .await;
    assert_eq!(s, 200);

    let (s, _, _) = w.call("GET", "/api/v1/nothing", None).await;
    assert_eq!(s, 404);
    let (s, _, _) = w.call("PUT", "/api/v1/keys", None).await;
    assert_eq!(s, 405);
    let (s, _, _) = w.call("GET", "/api/v1/keys/import", None).await;
    assert_eq!(s, 405);
    let (s, _, v) = w.call("GET", "/api/v1/keys/..%2F..%2Fetc", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_hash"))
    );
    let (s, _, _) = w
        .call("GET", &format!("/api/v1/keys/{}", "A".repeat(64)), None)
        .await;
    assert_eq!(s, 400);
    let (s, _, _) = w
        .call("GET", &format!("/api/v1/keys/{}", "a".repeat(64)), None)
        .await;
    assert_eq!(s, 404);
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(70 * 1024));
    let (s, _, v) = w.call("POST", "/api/v1/keys", Some(&big)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (s, _, v) = w.call("POST", "/api/v1/keys", Some("{not json")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (s, _, v) = w.call("GET", "/api/v1/keys?limit=5000", None).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("limit")));
    // Nothing was created by any of that.
    let (_, _, v) = w
        .call("GET", "/api/v1/keys?include_disabled=true", None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 0);

    let (s, _, _) = w.call_as("GET", "/api/v1/key", None, None, ip).await;
    assert_eq!(s, 401);
}

#[test]
fn store_failures_are_not_told_to_the_client() {
    let e = store_error(StoreError::Corrupt(
        "/srv/tollgate/db/conf: bad magic".into(),
    ));
    assert_eq!(e.status, 500);
    let text = String::from_utf8(e.to_json().to_vec()).unwrap();
    assert!(!text.contains("/srv") && !text.contains("magic"), "{text}");
    let cause = e.source.as_ref().expect("the cause is kept for the log");
    assert!(cause.to_string().contains("bad magic"));
    // Refusals the client can act on still say what they are.
    assert_eq!(store_error(StoreError::NotFound).status, 404);
}

/// Issue 9 item 13: `start`/`end` are seconds multiplied by 1000 with
/// checked arithmetic: 18 digits are a 400, never a panic or a wrap.
#[test]
fn huge_range_values_are_refused_not_wrapped() {
    let now = 1_795_000_000_000;
    for q in [
        "start=999999999999999999",
        "end=999999999999999999",
        "start=1700000000&end=999999999999999999",
        "start=999999999999999999&end=1700000000",
        "start=9223372036854775",
    ] {
        let pairs = query_pairs(Some(q)).unwrap();
        let e = reports::range_of(&pairs, now).expect_err(q);
        assert_eq!(e.status, 400, "{q}");
    }
    let pairs = query_pairs(Some("start=1794000000&end=1794003600")).unwrap();
    let r = reports::range_of(&pairs, now).unwrap();
    // Widened to whole hours.
    assert_eq!(
        (r.start_ms, r.end_ms),
        (1_793_998_800_000, 1_794_006_000_000)
    );
}
