//! Scoped admin tokens over the wire (issue 12): every admin route × every
//! scope, the root token, `X-Admin-Token`, tokens shown once and stored
//! hashed, unknown scopes, deletion, and tokens kept across a restart.

mod common;

use common::*;
use serde_json::{Value, json};

use tollgate::api::Scope;
use tollgate::config::RuntimeMode;

/// Every admin route the gateway serves, with a body where it needs one,
/// and the scope it needs. `{h}` is a key hash, `{a}` an account id.
const ROUTES: &[(&str, &str, Option<&str>, Scope)] = &[
    ("GET", "/api/v1/keys", None, Scope::KeysRead),
    (
        "POST",
        "/api/v1/keys",
        Some(r#"{"name":"x"}"#),
        Scope::KeysWrite,
    ),
    (
        "POST",
        "/api/v1/keys/import",
        Some(r#"{"key":"nope"}"#),
        Scope::KeysWrite,
    ),
    ("GET", "/api/v1/keys/{h}", None, Scope::KeysRead),
    (
        "PATCH",
        "/api/v1/keys/{h}",
        Some(r#"{"name":"y"}"#),
        Scope::KeysWrite,
    ),
    (
        "POST",
        "/api/v1/keys/{h}/credits",
        Some(r#"{"kind":"topup","amount":"1"}"#),
        Scope::CreditsWrite,
    ),
    ("GET", "/api/v1/keys/{h}/ledger", None, Scope::KeysRead),
    ("GET", "/api/v1/keys/{h}/usage", None, Scope::UsageRead),
    (
        "GET",
        "/api/v1/keys/{h}/usage/chart",
        None,
        Scope::UsageRead,
    ),
    ("GET", "/api/v1/keys/{h}/usage/logs", None, Scope::UsageRead),
    ("GET", "/api/v1/owners/o1/usage", None, Scope::UsageRead),
    (
        "GET",
        "/api/v1/owners/o1/usage/chart",
        None,
        Scope::UsageRead,
    ),
    ("GET", "/api/v1/usage", None, Scope::UsageRead),
    ("GET", "/api/v1/accounts", None, Scope::AccountsRead),
    (
        "POST",
        "/api/v1/accounts",
        Some(r#"{"name":"n"}"#),
        Scope::AccountsWrite,
    ),
    ("GET", "/api/v1/accounts/{a}", None, Scope::AccountsRead),
    (
        "PATCH",
        "/api/v1/accounts/{a}",
        Some(r#"{"name":"m"}"#),
        Scope::AccountsWrite,
    ),
    (
        "POST",
        "/api/v1/accounts/{a}/credits",
        Some(r#"{"kind":"topup","amount":"1"}"#),
        Scope::CreditsWrite,
    ),
    (
        "GET",
        "/api/v1/accounts/{a}/ledger",
        None,
        Scope::AccountsRead,
    ),
    ("GET", "/api/v1/admin/tokens", None, Scope::Admin),
    (
        "POST",
        "/api/v1/admin/tokens",
        Some(r#"{"name":"t","scopes":["admin"]}"#),
        Scope::Admin,
    ),
    (
        "DELETE",
        "/api/v1/admin/tokens/tok_none",
        None,
        Scope::Admin,
    ),
    ("POST", "/api/v1/admin/reload", None, Scope::Admin),
    // Last: they remove the key and the account the routes above use.
    ("DELETE", "/api/v1/keys/{h}", None, Scope::KeysWrite),
    (
        "DELETE",
        "/api/v1/accounts/{a}?force=true",
        None,
        Scope::AccountsWrite,
    ),
];

async fn call(
    gw: &TestGateway,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let auth = bearer(token);
    let body = body.map(|b| serde_json::from_str(b).expect("test body is JSON"));
    let (s, _, v) = send(method, &gw.url(path), &[("authorization", &auth)], body).await;
    (s, v)
}

/// Makes a token holding `scopes` with the root token; returns (id, token).
async fn make_token(gw: &TestGateway, name: &str, scopes: &[&str]) -> (String, String) {
    let (s, v) = call(
        gw,
        ADMIN,
        "POST",
        "/api/v1/admin/tokens",
        Some(&json!({"name": name, "scopes": scopes}).to_string()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        v["data"]["id"].as_str().expect("id").to_owned(),
        v["token"].as_str().expect("token").to_owned(),
    )
}

async fn fixtures(gw: &TestGateway) -> (String, String) {
    let (_, hash) = gw.create_key(json!({"name": "k", "owner": "o1"})).await;
    let (s, v) = call(
        gw,
        ADMIN,
        "POST",
        "/api/v1/accounts",
        Some(r#"{"id":"acc-1","name":"A"}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        hash,
        v["data"]["id"].as_str().expect("account id").to_owned(),
    )
}

/// Each route answered with each one-scope token: 403 `insufficient_scope`
/// naming the route's scope exactly when the token lacks it; otherwise the
/// handler ran (whatever it answered, it was not an auth refusal). The
/// root token passes everywhere.
async fn every_route_checks_its_scope(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (hash, account) = fixtures(&gw).await;
    let mut tokens = Vec::new();
    for s in Scope::ALL {
        let (_, t) = make_token(&gw, &format!("only-{}", s.as_str()), &[s.as_str()]).await;
        tokens.push((s, t));
    }
    let mut checked = 0;
    for (method, path, body, needs) in ROUTES {
        let path = path.replace("{h}", &hash).replace("{a}", &account);
        // Every token that lacks the scope first, so that the one that has
        // it (which may delete the fixture) runs after them.
        let mut order: Vec<&(Scope, String)> = tokens.iter().filter(|(s, _)| s != needs).collect();
        order.extend(tokens.iter().filter(|(s, _)| s == needs));
        for (scope, token) in order {
            let (s, v) = call(&gw, token, method, &path, *body).await;
            if scope == needs {
                assert!(
                    s != 401 && s != 403,
                    "{method} {path} with {}: {s} {v}",
                    scope.as_str()
                );
            } else {
                assert_error(s, &v, 403, "insufficient_scope");
                let msg = v["error"]["message"].as_str().unwrap_or("");
                assert!(msg.contains(needs.as_str()), "{method} {path}: {msg}");
                assert_eq!(v["error"]["metadata"]["required_scope"], needs.as_str());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len() * Scope::ALL.len());
    // Root holds everything (fresh fixtures: the last routes deleted them).
    let (hash, account) = fixtures(&gw).await;
    for (method, path, body, _) in ROUTES {
        let path = path.replace("{h}", &hash).replace("{a}", &account);
        let body = body.map(|b| b.replace("\"t\"", "\"t2\""));
        let (s, v) = call(&gw, ADMIN, method, &path, body.as_deref()).await;
        assert!(s != 401 && s != 403, "root: {method} {path}: {s} {v}");
    }
}

/// A token holding several scopes may do what each allows and no more.
async fn scopes_combine(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (_, t) = make_token(&gw, "ops", &["keys:read", "usage:read"]).await;
    assert_eq!(call(&gw, &t, "GET", "/api/v1/keys", None).await.0, 200);
    assert_eq!(call(&gw, &t, "GET", "/api/v1/usage", None).await.0, 200);
    let (s, v) = call(&gw, &t, "POST", "/api/v1/keys", Some(r#"{"name":"z"}"#)).await;
    assert_error(s, &v, 403, "insufficient_scope");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys:write")
    );
}

common::both_modes!(every_route_checks_its_scope, scopes_combine);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_shown_once_listed_without_secrets_and_deleted() {
    let gw = TestGateway::start();
    let (s, v) = call(
        &gw,
        ADMIN,
        "POST",
        "/api/v1/admin/tokens",
        Some(r#"{"name":"billing-bot","scopes":["credits:write","keys:read"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let id = v["data"]["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tg-tok-") && token.len() >= 40, "{token}");
    assert_eq!(v["data"]["name"], "billing-bot");
    assert_eq!(v["data"]["scopes"], json!(["keys:read", "credits:write"]));

    let (s, list) = call(&gw, ADMIN, "GET", "/api/v1/admin/tokens", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], id.as_str());
    let text = list.to_string();
    assert!(!text.contains(&token) && !text.contains("hash"), "{text}");

    // Stored as SHA-256 only: the token's text is nowhere in the store.
    gw.flush().await;
    let stored = gw.app().store.admin_tokens().unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].hash, token);
    assert_eq!(stored[0].hash.len(), 64);

    // Seed 002's header works as well as Bearer.
    let (s, _, _) = send(
        "GET",
        &gw.url("/api/v1/keys"),
        &[("x-admin-token", &token)],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = send(
        "GET",
        &gw.url("/api/v1/keys"),
        &[("x-admin-token", ADMIN)],
        None,
    )
    .await;
    assert_eq!(s, 200);

    // Same name twice: refused (names are the audit log's actors).
    let (s, v) = call(
        &gw,
        ADMIN,
        "POST",
        "/api/v1/admin/tokens",
        Some(r#"{"name":"billing-bot","scopes":["keys:read"]}"#),
    )
    .await;
    assert_error(s, &v, 409, "token_exists");

    let (s, v) = call(
        &gw,
        ADMIN,
        "DELETE",
        &format!("/api/v1/admin/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(&gw, &token, "GET", "/api/v1/keys", None).await;
    assert_error(s, &v, 401, "invalid_api_key");
    let (s, v) = call(
        &gw,
        ADMIN,
        "DELETE",
        &format!("/api/v1/admin/tokens/{id}"),
        None,
    )
    .await;
    assert_error(s, &v, 404, "not_found");

    // Both writes are audited with actor, address and the record's summary,
    // never the token; the refused second delete left nothing.
    let (s, audit) = call(
        &gw,
        ADMIN,
        "GET",
        &format!("/api/v1/audit?target={id}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{audit}");
    let rows = audit["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{audit}");
    assert_eq!(rows[0]["action"], "admin_token.create");
    assert_eq!(rows[0]["actor"], "root");
    assert_eq!(rows[0]["ip"], "127.0.0.1");
    assert_eq!(rows[0]["before"], Value::Null);
    assert_eq!(rows[0]["after"]["name"], "billing-bot");
    assert_eq!(rows[0]["after"]["hash"], stored[0].hash.as_str());
    assert_eq!(rows[1]["action"], "admin_token.delete");
    assert_eq!(rows[1]["before"]["id"], id.as_str());
    assert_eq!(rows[1]["after"], Value::Null);
    assert!(!audit.to_string().contains(&token), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_are_refused() {
    let gw = TestGateway::start();
    let post = |body: &'static str| call(&gw, ADMIN, "POST", "/api/v1/admin/tokens", Some(body));
    let (s, v) = post(r#"{"name":"a","scopes":["keys:read","keys:everything"]}"#).await;
    assert_error(s, &v, 400, "invalid_scope");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys:everything")
    );
    let (s, v) = post(r#"{"name":"a","scopes":[]}"#).await;
    assert_error(s, &v, 400, "invalid_scope");
    let (s, v) = post(r#"{"name":"a","scopes":"admin"}"#).await;
    assert_error(s, &v, 400, "invalid_type");
    let (s, v) = post(r#"{"name":"root","scopes":["admin"]}"#).await;
    assert_error(s, &v, 400, "invalid_name");
    let (s, v) = post(r#"{"name":"","scopes":["admin"]}"#).await;
    assert_error(s, &v, 400, "invalid_name");
    let (s, v) = post(r#"{"scopes":["admin"]}"#).await;
    assert_error(s, &v, 400, "missing_field");
    let (s, v) = post(r#"{"name":"a","scopes":["admin"],"extra":1}"#).await;
    assert_error(s, &v, 400, "unknown_field");
    assert!(gw.app().store.admin_tokens().unwrap().is_empty());

    // An `admin` token manages tokens but cannot grant what it lacks.
    let (_, admin_only) = make_token(&gw, "token-admin", &["admin"]).await;
    let (s, v) = call(
        &gw,
        &admin_only,
        "POST",
        "/api/v1/admin/tokens",
        Some(r#"{"name":"escalate","scopes":["keys:write"]}"#),
    )
    .await;
    assert_error(s, &v, 403, "insufficient_scope");
    let (s, v) = call(
        &gw,
        &admin_only,
        "POST",
        "/api/v1/admin/tokens",
        Some(r#"{"name":"peer","scopes":["admin"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");

    // A wrong token of the scoped shape is an authentication failure.
    let (s, v) = call(
        &gw,
        "tg-tok-0000000000000000000000000000000000000000",
        "GET",
        "/api/v1/keys",
        None,
    )
    .await;
    assert_error(s, &v, 401, "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_restart() {
    let mut gw = TestGateway::start();
    let (_, t) = make_token(&gw, "reader", &["keys:read"]).await;
    gw.flush().await;
    // Keep the directory (a TestGateway removes its own when dropped).
    let gateway = gw.gateway.take().expect("running");
    tokio::task::spawn_blocking(move || gateway.shutdown())
        .await
        .unwrap();
    let data = std::mem::replace(&mut gw.data, temp_dir("tokens-restart-scratch"));
    drop(gw);
    // Same storage, new gateway: the token is read back into memory.
    let mock = tollgate_mock::MockUpstream::start(Default::default()).unwrap();
    let gw2 = TestGateway::start_on(
        RuntimeMode::PerCore,
        "",
        |c| c.storage.path = data.clone(),
        mock,
    );
    assert_eq!(call(&gw2, &t, "GET", "/api/v1/keys", None).await.0, 200);
    let (s, v) = call(&gw2, &t, "POST", "/api/v1/keys", Some(r#"{"name":"z"}"#)).await;
    assert_error(s, &v, 403, "insufficient_scope");
    let _ = std::fs::remove_dir_all(&data);
}
