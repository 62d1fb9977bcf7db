//! The seed documents' own client calls, replayed exactly as each document
//! writes them (paths, headers, bodies, the fields it reads) against a live
//! gateway, plus the bad inputs each document's tests list.
//!
//! - 000: OpenRouter trial-key provisioning (`OpenRouterService`);
//! - 001: the Supabase trigger's new-api import, and the portal's
//!   consumption API;
//! - 002: the licence / credit server and its client integration;
//! - 004: per-route prices, billing modes, the admin billing endpoints.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tollgate::config::{BillingMode, RuntimeMode};
use tollgate::money::Pico;

both_modes!(
    seed_000_openrouter_trial_keys,
    seed_001_newapi_import_and_consumption,
    seed_002_license_server,
    seed_004_route_prices_and_modes,
);

/// A second, built-in mock upstream serving the models the documents name.
const SEED_UPSTREAM: &str = r#"
[[upstreams]]
name = "seed-mock"
mock = true
models = ["openai/*", "gemini-*"]
role_map = { model = "assistant" }
[models."openai/gpt-3.5-turbo"]
input = "0.5"
output = "1.5"
max_output_tokens = 256
[models."gemini-2.0-flash-exp"]
input = "0.1"
output = "0.4"
max_output_tokens = 256
"#;

async fn call(
    gw: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let (s, _, v) = send(method, &gw.url(path), headers, body).await;
    (s, v)
}

fn pico(v: &Value) -> Pico {
    Pico::parse_usd(v.to_string().trim_matches('"')).unwrap_or_else(|_| panic!("amount {v}"))
}

fn admin_bearer() -> String {
    format!("Bearer {ADMIN}")
}

/// Seed 000: `createTrialApiKey`, the client's chat, `getKeyUsage`,
/// `disableApiKey`, `deleteApiKey`, and the sweeper's expired / used-up
/// marks.
async fn seed_000_openrouter_trial_keys(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, SEED_UPSTREAM, |_| {});
    let provisioning = admin_bearer();
    let user_id = "42";
    // createTrialApiKey: axios.post(`${baseUrl}/keys`, {name, label, limit}, headers)
    let (s, created) = call(
        &gw,
        "POST",
        "/api/v1/keys",
        &[
            ("authorization", &provisioning),
            ("content-type", "application/json"),
        ],
        Some(json!({
            "name": format!("Trial Key for User {user_id}"),
            "label": format!("trial-user-{user_id}"),
            "limit": 0.0001
        })),
    )
    .await;
    assert!((200..300).contains(&s), "create: {s} {created}");
    // return { key: response.data.key, hash: response.data.data.hash }
    let key = created["key"].as_str().expect("key").to_owned();
    let hash = created["data"]["hash"].as_str().expect("hash").to_owned();
    assert_eq!(created["data"]["limit"], json!(0.0001));
    assert_eq!(created["data"]["status"], "active");
    assert_eq!(created["data"]["metadata"]["label"], "trial-user-42");
    // OpenRouter's other create fields are accepted; a typo still is not.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/keys",
        &[("authorization", &provisioning)],
        Some(
            json!({"name": "n", "include_byok_in_limit": false, "workspace_id": "w",
                    "creator_user_id": "u", "limit_reset": "monthly",
                    "expires_at": "2099-01-01T00:00:00Z"}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/keys",
        &[("authorization", &provisioning)],
        Some(json!({"name": "n", "limt": 1})),
    )
    .await;
    assert_error(s, &v, 400, "unknown_field");

    // The client: new OpenAI({baseURL, apiKey, defaultHeaders}).chat.completions.create(…)
    let (s, answer) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &bearer(&key)),
            ("http-referer", "your-app-url"),
            ("x-title", "Your App Name"),
        ],
        Some(json!({
            "model": "openai/gpt-3.5-turbo",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 100
        })),
    )
    .await;
    assert_eq!(s, 200, "{answer}");

    // getKeyUsage: GET `${baseUrl}/auth/key`, reads data.usage/limit/limit_remaining
    let (s, v) = call(
        &gw,
        "GET",
        "/api/v1/auth/key",
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let d = &v["data"];
    let (usage, limit, remaining) = (
        pico(&d["usage"]),
        pico(&d["limit"]),
        pico(&d["limit_remaining"]),
    );
    assert!(usage > Pico::ZERO, "{d}");
    assert_eq!(limit, Pico::parse_usd("0.0001").unwrap());
    assert_eq!(remaining, Pico(limit.0 - usage.0), "{d}");

    // disableApiKey: PATCH `${baseUrl}/keys/${keyHash}` {disabled: true}
    let (s, v) = call(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        &[
            ("authorization", &provisioning),
            ("content-type", "application/json"),
        ],
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["status"], "disabled");
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        Some(chat("openai/gpt-3.5-turbo", false)),
    )
    .await;
    assert_error(s, &v, 403, "key_disabled");

    // deleteApiKey: DELETE `${baseUrl}/keys/${keyHash}`
    let (s, v) = call(
        &gw,
        "DELETE",
        &format!("/api/v1/keys/{hash}"),
        &[("authorization", &provisioning)],
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = call(
        &gw,
        "GET",
        "/api/v1/auth/key",
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(s, 401);
    // A wrong provisioning key.
    let (s, v) = call(
        &gw,
        "GET",
        "/api/v1/keys",
        &[("authorization", "Bearer wrong-token")],
        None,
    )
    .await;
    assert_error(s, &v, 401, "invalid_api_key");

    // checkAndExpireKeys: expired (7 days) and used-up (50 uses) keys are
    // marked so in the key's answer.
    let (trial, trial_hash) = gw
        .create_key(json!({"name": "trial", "plan": "trial", "owner": "u-7"}))
        .await;
    let (used, used_hash) = gw
        .create_key(json!({"name": "used", "max_requests": 1}))
        .await;
    let (s, _) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&used))],
        Some(chat("openai/gpt-3.5-turbo", false)),
    )
    .await;
    assert_eq!(s, 200);
    let key_status = |v: Value| v["data"]["status"].as_str().unwrap_or("").to_owned();
    assert_eq!(
        key_status(gw.admin_get(&format!("/api/v1/keys/{used_hash}")).await),
        "exhausted"
    );
    assert_eq!(
        key_status(gw.admin_get(&format!("/api/v1/keys/{trial_hash}")).await),
        "active"
    );
    gw.clock.advance(Duration::from_secs(7 * 86_400 + 1));
    assert_eq!(
        key_status(gw.admin_get(&format!("/api/v1/keys/{trial_hash}")).await),
        "expired"
    );
    let (s, v) = call(
        &gw,
        "GET",
        "/api/v1/key",
        &[("authorization", &bearer(&trial))],
        None,
    )
    .await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (200, Some("expired")),
        "{v}"
    );
}

/// Seed 001: the trigger's `net.http_post` to `/api/token/import`, the
/// user's `sk-` key, and the portal's detail / chart / logs.
async fn seed_001_newapi_import_and_consumption(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let pool_key: String = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL".into();
    assert_eq!(pool_key.len(), 48);
    let trigger = |body: Value, token: String| {
        let gw = &gw;
        async move {
            call(
                gw,
                "POST",
                "/api/token/import",
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {token}")),
                ],
                Some(body),
            )
            .await
        }
    };
    let user = "8d0f7c3e-2b1a-4c5d-9e8f-0a1b2c3d4e5f";
    let body = json!({
        "key": "sk-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL".replace("sk-", ""),
        "external_user_id": user,
        "name": "default",
        "unlimited_quota": true
    });
    let (s, v) = trigger(body.clone(), ADMIN.into()).await;
    // IF response_status = 200 … (response_body::jsonb->'data'->>'token_id')::integer
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["success"], true);
    let token_id = v["data"]["token_id"].as_u64().expect("integer token_id");
    // Duplicate import: same key, same user → same token_id.
    let (s, again) = trigger(body.clone(), ADMIN.into()).await;
    assert_eq!(
        (s, again["data"]["token_id"].as_u64()),
        (200, Some(token_id)),
        "{again}"
    );
    // The same key for another user → 409.
    let mut other = body.clone();
    other["external_user_id"] = json!("another-user");
    let (s, v) = trigger(other, ADMIN.into()).await;
    assert_error(s, &v, 409, "key_exists");
    // Bad key formats → 400.
    for bad in [
        "short",
        &format!("sk-{pool_key}"),
        &format!("{}!", &pool_key[..47]),
    ] {
        let mut b = body.clone();
        b["key"] = json!(bad);
        let (s, v) = trigger(b, ADMIN.into()).await;
        assert_error(s, &v, 400, "invalid_key_format");
    }
    // Wrong admin token → 401.
    let (s, v) = trigger(body.clone(), "not-the-admin-token".into()).await;
    assert_error(s, &v, 401, "invalid_api_key");
    // A second key gets another id.
    let mut second = body.clone();
    second["key"] = json!("ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfe");
    let (_, v) = trigger(second, ADMIN.into()).await;
    assert_ne!(v["data"]["token_id"].as_u64(), Some(token_id));

    // The user's client presents sk- + the 48.
    let sk = format!("sk-{pool_key}");
    for _ in 0..3 {
        let (s, v) = call(
            &gw,
            "POST",
            "/v1/chat/completions",
            &[("authorization", &bearer(&sk))],
            Some(chat("demo-chat", false)),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    gw.flush().await;
    let auth = [("authorization", bearer(&sk))];
    let h: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // curl -H "Authorization: Bearer sk-xxx" ".../api/usage/token/detail?start=…&end=…"
    let now = gw.clock.now_secs();
    let (s, v) = call(
        &gw,
        "GET",
        &format!(
            "/api/usage/token/detail?start={}&end={}",
            now - 86_400,
            now + 60
        ),
        &h,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["success"], true);
    let d = &v["data"];
    let sum = &d["summary"];
    assert_eq!(sum["total_requests"], 3, "{sum}");
    assert!(sum["total_tokens"].as_u64().unwrap() > 0);
    assert!(sum["avg_latency_ms"].is_u64());
    let cost = pico(&sum["total_cost"]);
    let quota = sum["total_quota"].as_i64().expect("integer quota");
    // 500,000 quota per USD: quota = cost × 5e5, rounded.
    assert_eq!(
        quota,
        ((cost.0 as i128 * 500_000 + 500_000_000_000) / 1_000_000_000_000) as i64
    );
    let m = &d["by_model"][0];
    assert_eq!(m["model_name"], "demo-chat");
    assert!(m["quota"].is_i64() && m["requests"] == 3 && m["tokens"].is_u64());
    assert_eq!(m["percentage"], 100.0);
    let day = d["by_day"].as_array().unwrap().last().unwrap().clone();
    assert!(
        day["date"].is_string()
            && day["quota"].is_i64()
            && day["requests"] == 3
            && day["tokens"].is_u64(),
        "{day}"
    );
    // The document's own example range (2024-01-01): valid, empty.
    let (s, v) = call(
        &gw,
        "GET",
        "/api/usage/token/detail?start=1704067200&end=1704153600",
        &h,
        None,
    )
    .await;
    assert_eq!(
        (s, &v["data"]["summary"]["total_quota"]),
        (200, &json!(0)),
        "{v}"
    );
    // chart?granularity=day, and hourly {hour, quota, requests}
    let (s, v) = call(
        &gw,
        "GET",
        "/api/usage/token/chart?granularity=day",
        &h,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["data"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["quota"].is_i64())
    );
    let (s, v) = call(
        &gw,
        "GET",
        "/api/usage/token/chart?granularity=hour",
        &h,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let points = v["data"]["data"].as_array().unwrap();
    let busy: Vec<&Value> = points.iter().filter(|p| p["requests"] != 0).collect();
    assert_eq!(busy.len(), 1, "{v}");
    assert!(
        busy[0]["hour"]
            .as_str()
            .is_some_and(|h| h.len() == 16 && h.ends_with(":00"))
    );
    assert_eq!(busy[0]["quota"].as_i64(), Some(quota));
    // logs?page=1&page_size=10
    let (s, v) = call(
        &gw,
        "GET",
        "/api/usage/token/logs?page=1&page_size=10",
        &h,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let items = v["data"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(
        items
            .iter()
            .all(|i| i["model_name"] == "demo-chat" && i["quota"].is_i64())
    );
    assert_eq!(v["data"]["token_id"].as_u64(), Some(token_id));
    // the existing GET /api/usage/token/
    let (s, v) = call(&gw, "GET", "/api/usage/token/", &h, None).await;
    assert_eq!(
        (s, &v["success"], &v["data"]["unlimited_quota"]),
        (200, &json!(true), &json!(true)),
        "{v}"
    );
    assert_eq!(v["data"]["token_id"].as_u64(), Some(token_id));
}

/// Seed 002: the licence server's endpoints and its client integration
/// (licence key and device id as headers), the daily fee, the unlimited
/// test email, `role_map`.
async fn seed_002_license_server(mode: RuntimeMode) {
    let extra = format!(
        "{SEED_UPSTREAM}\n[plans.licence]\ndaily_fee = \"0.33\"\n[compat.license]\nplan = \"licence\"\n"
    );
    // The recorded mock stands for a Hugging Face Space that wants OpenAI's roles.
    let gw = TestGateway::start_mode(mode, &extra, |c| {
        c.upstreams[0].role_map = [("model".to_owned(), "assistant".to_owned())].into();
    });
    let admin = [
        ("content-type", "application/json"),
        ("x-admin-token", ADMIN),
    ];
    let email = "user@example.com";

    let (s, v) = call(&gw, "GET", "/api/v1/health", &[], None).await;
    assert_eq!((s, &v["success"]), (200, &json!(true)));

    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/generate",
        &admin,
        Some(json!({"email": email, "credits": 150})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let licence = v["license_key"].as_str().expect("licence key").to_owned();
    assert_eq!(v["credits"], json!(150));
    // One licence per email.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/generate",
        &admin,
        Some(json!({"email": email})),
    )
    .await;
    assert_eq!(
        (s, &v["success"], &v["error"]["code"]),
        (409, &json!(false), &json!("license_exists")),
        "{v}"
    );
    // The test email: an unlimited account, any number of licences.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/accounts",
        &[("authorization", &admin_bearer())],
        Some(json!({"id": "tester", "email": "943113638@qq.com", "unlimited": true})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    for _ in 0..2 {
        let (s, v) = call(
            &gw,
            "POST",
            "/api/v1/license/generate",
            &admin,
            Some(json!({"email": "943113638@qq.com"})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/deduct",
        &admin,
        Some(json!({"email": "943113638@qq.com", "amount": 1000})),
    )
    .await;
    assert_eq!((s, &v["success"]), (200, &json!(true)), "{v}");

    // verify {license_key, device_id}: binds the device.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/verify",
        &[("content-type", "application/json")],
        Some(json!({"license_key": licence, "device_id": "device-A"})),
    )
    .await;
    assert_eq!(
        (s, &v["success"], &v["valid"]),
        (200, &json!(true), &json!(true)),
        "{v}"
    );
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/verify",
        &[],
        Some(json!({"license_key": licence, "device_id": "device-B"})),
    )
    .await;
    assert_eq!(
        (s, &v["success"], &v["error"]["code"]),
        (403, &json!(false), &json!("device_limit")),
        "{v}"
    );
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/verify",
        &[],
        Some(json!({"license_key": "sk-nope", "device_id": "device-A"})),
    )
    .await;
    assert_eq!((s, &v["success"]), (401, &json!(false)), "{v}");

    // checkBalance: fetch(`/api/v1/license/balance/${email}`) — not public.
    let path = format!("/api/v1/license/balance/{email}");
    let (s, v) = call(&gw, "GET", &path, &[], None).await;
    assert_eq!((s, &v["success"]), (401, &json!(false)), "{v}");
    let (s, v) = call(&gw, "GET", &path, &[("x-admin-token", ADMIN)], None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["email"], &v["credits"]), (&json!(email), &json!(150)));
    let label = v["license_key"].as_str().expect("label").to_owned();
    let (s, v) = call(&gw, "GET", &path, &[("x-license-key", &licence)], None).await;
    assert_eq!((s, &v["credits"]), (200, &json!(150)), "{v}");
    let (s, _) = call(
        &gw,
        "GET",
        "/api/v1/license/balance/943113638@qq.com",
        &[("x-license-key", &licence)],
        None,
    )
    .await;
    assert_eq!(s, 401, "another email's balance");
    let (s, v) = call(
        &gw,
        "GET",
        "/api/v1/license/balance/nobody@example.com",
        &[("x-admin-token", ADMIN)],
        None,
    )
    .await;
    assert_eq!((s, &v["success"]), (404, &json!(false)), "{v}");
    let (s, _) = call(&gw, "GET", &path, &[("x-admin-token", "wrong")], None).await;
    assert_eq!(s, 401);

    // deduct_credits: result['remaining_credits']
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/deduct",
        &admin,
        Some(json!({"email": email, "amount": 10.0})),
    )
    .await;
    assert_eq!(
        (s, &v["success"], &v["remaining_credits"]),
        (200, &json!(true), &json!(140)),
        "{v}"
    );
    // Beyond the balance: fails, nothing changed.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/deduct",
        &admin,
        Some(json!({"email": email, "amount": 1000})),
    )
    .await;
    assert_eq!((s, &v["success"]), (402, &json!(false)), "{v}");
    let (_, v) = call(&gw, "GET", &path, &[("x-admin-token", ADMIN)], None).await;
    assert_eq!(v["credits"], json!(140));
    // Unknown email, wrong admin token.
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/deduct",
        &admin,
        Some(json!({"email": "nobody@example.com", "amount": 1})),
    )
    .await;
    assert_eq!((s, &v["success"]), (404, &json!(false)), "{v}");
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/deduct",
        &[("x-admin-token", "wrong")],
        Some(json!({"email": email, "amount": 1})),
    )
    .await;
    assert_eq!((s, &v["success"]), (401, &json!(false)), "{v}");
    // add_credits: result['license_info']['credits']
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/recharge",
        &admin,
        Some(json!({"email": email, "amount": 50.0})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let info = &v["license_info"];
    assert_eq!(
        (&info["credits"], &info["email"], &info["license_key"]),
        (&json!(190), &json!(email), &json!(label))
    );
    assert!(
        info["last_updated_at"]
            .as_str()
            .is_some_and(|t| t.len() == 19),
        "{info}"
    );
    let (s, v) = call(
        &gw,
        "GET",
        &format!("/api/v1/license/info/{licence}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(
        (s, &v["license_info"]["devices"]),
        (200, &json!(["device-A"])),
        "{v}"
    );

    // Client integration: licence key and device id as headers; the first
    // request of the day pays the 0.33 credit fee, the second does not.
    let lic_headers = [
        ("x-license-key", licence.as_str()),
        ("x-device-id", "device-A"),
    ];
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &lic_headers,
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let credits = |v: &Value| pico(&v["credits"]);
    let (_, after_one) = call(&gw, "GET", &path, &[("x-admin-token", ADMIN)], None).await;
    let first = Pico(Pico::usd(190).0 - credits(&after_one).0);
    assert!(
        first >= Pico::parse_usd("0.33").unwrap() && first < Pico::parse_usd("0.34").unwrap(),
        "{first}"
    );
    let (s, _) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &lic_headers,
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200);
    let (_, after_two) = call(&gw, "GET", &path, &[("x-admin-token", ADMIN)], None).await;
    let second = Pico(credits(&after_one).0 - credits(&after_two).0);
    assert!(
        second > Pico::ZERO && second < Pico::parse_usd("0.01").unwrap(),
        "{second}"
    );
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("x-license-key", &licence)],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 403, "device_required");

    // Hugging Face Spaces: the `model` role reaches the upstream as `assistant`.
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &lic_headers,
        Some(json!({"model": "demo-chat", "messages": [
            {"role": "user", "content": "hi"}, {"role": "model", "content": "hello"},
            {"role": "user", "content": "again"}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let seen = gw.mock.requests();
    let sent: Value = serde_json::from_slice(&seen.last().expect("forwarded").body).expect("json");
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{sent}");

    // revoke: the licence no longer verifies.
    let (s, v) = call(
        &gw,
        "POST",
        &format!("/api/v1/license/revoke/{licence}"),
        &admin,
        None,
    )
    .await;
    assert_eq!((s, &v["success"]), (200, &json!(true)), "{v}");
    let (s, v) = call(
        &gw,
        "POST",
        "/api/v1/license/verify",
        &[],
        Some(json!({"license_key": licence, "device_id": "device-A"})),
    )
    .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (403, &json!("key_disabled")),
        "{v}"
    );
}

/// Seed 004: 15 picoUSD a token on chat over the model's price, 500
/// picoUSD an upload, free routes; `observe` and `off`; the admin billing
/// endpoints.
async fn seed_004_route_prices_and_modes(mode: RuntimeMode) {
    const ROUTES: &str = r#"
[routes."/v1/chat/completions"]
input = "0.000015"
output = "0.000015"
[routes."/v1/completions"]
input = "0.000015"
output = "0.000015"
[routes."/v1/files"]
request = "0.0000000005"
[routes."/v1/uploads"]
request = "0.0000000005"
[routes."/v1/moderations"]
free = true
"#;
    let gw = TestGateway::start_mode(mode, ROUTES, |_| {});
    let key = gw.open_key().await;
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let tokens = v["usage"]["prompt_tokens"].as_i64().unwrap()
        + v["usage"]["completion_tokens"].as_i64().unwrap();
    // An upload (multipart), priced per request.
    let boundary = "XyZ";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{{}}\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let upload = http::Request::builder()
        .method("POST")
        .uri(gw.url("/v1/files"))
        .header("authorization", bearer(&key))
        .header("content-type", ct)
        .body(http_body_util::Full::new(bytes::Bytes::from(form)))
        .expect("request builds");
    let (s, _, b) = send_raw(upload).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    gw.flush().await;
    let (_, logs) = call(
        &gw,
        "GET",
        "/api/usage/token/logs",
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    let items = logs["data"]["items"].as_array().unwrap().clone();
    let by_route = |r: &str| {
        items
            .iter()
            .find(|i| i["route"].as_str().is_some_and(|x| x.contains(r)))
            .cloned()
    };
    let chat_row = by_route("chat").expect("chat record");
    assert_eq!(
        pico(&chat_row["cost"]),
        Pico(15 * tokens),
        "15 picoUSD a token: {chat_row}"
    );
    let upload = items.iter().find(|i| pico(&i["cost"]) == Pico(500));
    assert!(upload.is_some(), "500 picoUSD an upload: {items:?}");

    // Admin billing endpoints.
    let health = gw.admin_get("/api/v1/admin/health").await;
    assert_eq!(
        (&health["success"], &health["mode"]),
        (&json!(true), &json!("enforce"))
    );
    let status = gw.admin_get("/api/v1/admin/billing/status").await;
    assert_eq!(status["mode"], "enforce");
    assert_eq!(status["today"]["requests"], 2);
    assert_eq!(pico(&status["all_time"]["cost"]), Pico(15 * tokens + 500));
    let stats = gw.admin_get("/api/v1/admin/billing/stats").await;
    let chat_stats = stats["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "demo-chat")
        .cloned()
        .expect("demo-chat");
    assert_eq!(pico(&chat_stats["cost"]), Pico(15 * tokens));
    assert!(
        stats["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["route"] == "/v1/moderations" && r["free"] == true)
    );
    let (s, _, raw) = send_raw(request(
        "GET",
        &gw.url("/api/v1/admin/config"),
        &[("x-admin-token", ADMIN)],
        None,
    ))
    .await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains(r#""input":0.000015"#), "exact prices: {text}");
    assert!(text.contains(r#""mode":"enforce""#));
    assert!(!text.contains(ADMIN));
    let (s, _) = call(
        &gw,
        "GET",
        "/api/v1/admin/config",
        &[("x-admin-token", "wrong")],
        None,
    )
    .await;
    assert_eq!(s, 401);
    drop(gw);

    // observe: a key below one request's price is served and charged.
    let gw = TestGateway::start_mode(mode, "", |c| c.billing.mode = BillingMode::Observe);
    let (poor, poor_hash) = gw
        .create_key(json!({"name": "poor", "limit": "0.00000001"}))
        .await;
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&poor))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "observe never refuses for money: {v}");
    let seen = gw.mock.requests();
    let sent: Value = serde_json::from_slice(&seen.last().expect("forwarded").body).expect("json");
    assert_eq!(sent["max_completion_tokens"], 256, "not capped: {sent}");
    let info = gw.admin_get(&format!("/api/v1/keys/{poor_hash}")).await;
    assert!(
        pico(&info["data"]["usage"]) > Pico::parse_usd("0.00000001").unwrap(),
        "{info}"
    );
    assert_eq!(
        gw.admin_get("/api/v1/admin/billing/status").await["mode"],
        "observe"
    );
    drop(gw);

    // off: keys and limits only, nothing metered.
    let gw = TestGateway::start_mode(mode, "", |c| c.billing.mode = BillingMode::Off);
    let (zero, zero_hash) = gw
        .create_key(json!({"name": "zero", "limit": 0, "max_requests": 1}))
        .await;
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&zero))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let info = gw.admin_get(&format!("/api/v1/keys/{zero_hash}")).await;
    assert_eq!(
        (pico(&info["data"]["usage"]), &info["data"]["requests"]),
        (Pico::ZERO, &json!(1)),
        "{info}"
    );
    let (s, v) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &bearer(&zero))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 402, "request_limit_reached");
}
