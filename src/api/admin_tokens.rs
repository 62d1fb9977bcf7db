//! `/api/v1/admin/…`: scoped admin tokens (create, list, delete) and config
//! reload. Both need the `admin` scope (see [`super::scopes`]).
//!
//! A token is shown once, in the answer that makes it; the store keeps its
//! SHA-256 only. A caller may grant only scopes it holds itself, so an
//! `admin`-only token cannot mint a `keys:write` one.

use http::StatusCode;
use serde::Serialize;

use super::scopes::{Scopes, TokenEntry, digest, insufficient};
use super::{Ctx, Data, Fields, admin_write_lock, invalid, json, store_error};
use crate::error::ApiError;
use crate::store::StoreError;
use crate::store::admin_tokens::AdminTokenRecord;

/// Longest token name (it is the audit log's actor).
const NAME_MAX: usize = 64;

/// A token as the API shows it: never the token, never its hash.
#[derive(Serialize)]
struct TokenView<'a> {
    /// What DELETE names.
    id: &'a str,
    /// The actor its calls are recorded under.
    name: &'a str,
    /// In the canonical order.
    scopes: Vec<&'static str>,
    /// Unix ms.
    created_at: i64,
}

impl<'a> TokenView<'a> {
    fn of(e: &'a TokenEntry) -> TokenView<'a> {
        TokenView {
            id: &e.record.id,
            name: &e.record.name,
            scopes: e.scopes().names(),
            created_at: e.record.created_at,
        }
    }
}

/// `GET /api/v1/admin/tokens`
pub(super) fn list(ctx: &Ctx<'_>) -> Result<http::Response<crate::Body>, ApiError> {
    let all = ctx.admin_tokens.snapshot();
    let views: Vec<TokenView<'_>> = all.iter().map(TokenView::of).collect();
    json(StatusCode::OK, &Data { data: views })
}

/// `POST /api/v1/admin/tokens` `{name, scopes}`
pub(super) async fn create(
    ctx: &Ctx<'_>,
    f: &Fields,
) -> Result<http::Response<crate::Body>, ApiError> {
    f.only(&["name", "scopes"])?;
    let name: String = f.required("name", "a string")?;
    let name = name.trim().to_owned();
    if name.is_empty() || name.chars().count() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            "invalid_name",
            format!("`name` must be 1 to {NAME_MAX} printable characters."),
        ));
    }
    if name == "root" {
        return Err(invalid(
            "name",
            "invalid_name",
            "`root` is the environment's token; choose another name.",
        ));
    }
    let names: Vec<String> = f.required("scopes", "an array of scope names")?;
    let scopes = Scopes::parse(names.iter().map(String::as_str)).map_err(|bad| {
        invalid(
            "scopes",
            "invalid_scope",
            format!(
                "Unknown scope `{}`. Known scopes: {}.",
                crate::error::truncate(bad, 64),
                Scopes::ROOT.names().join(", ")
            ),
        )
    })?;
    if scopes == Scopes::default() {
        return Err(invalid(
            "scopes",
            "invalid_scope",
            "`scopes` must name at least one scope.",
        ));
    }
    // Nobody grants more than they hold.
    if let Some(caller) = ctx.caller
        && let Some(missing) = scopes.iter().find(|s| !caller.scopes.has(*s))
    {
        return Err(insufficient(missing));
    }
    let token = crate::gate::generate_key().replacen("sk-tg-", "tg-tok-", 1);
    let id = format!("tok_{}", &crate::gate::generate_key()[6..22]);
    let _write = admin_write_lock().await;
    if ctx
        .admin_tokens
        .snapshot()
        .iter()
        .any(|e| e.record.name == name)
    {
        return Err(ApiError::conflict(
            "token_exists",
            "An admin token with this name exists; names are the audit log's actors.",
        )
        .with_param("name"));
    }
    let record = AdminTokenRecord {
        id,
        name,
        scopes: scopes.names().into_iter().map(str::to_owned).collect(),
        hash: hex::encode(digest(token.as_bytes())),
        created_at: ctx.clock.now_ms(),
    };
    ctx.store
        .put_admin_token(record.clone())
        .await
        .map_err(|e| match e {
            StoreError::Exists => ApiError::conflict("token_exists", "Token id collision; retry."),
            other => store_error(other),
        })?;
    let entry = TokenEntry::of(record)
        .ok_or_else(|| ApiError::internal("a token record just made does not parse"))?;
    tracing::info!(id = %entry.record.id, name = %entry.record.name, by = ctx.actor(), "admin token created");
    ctx.admin_tokens.insert(entry.clone());
    super::cluster::admin_token_changed(ctx, &entry.record.id).await;
    #[derive(Serialize)]
    struct Created<'a> {
        data: TokenView<'a>,
        /// The token itself: shown this once, never stored.
        token: &'a str,
    }
    json(
        StatusCode::CREATED,
        &Created {
            data: TokenView::of(&entry),
            token: &token,
        },
    )
}

/// `DELETE /api/v1/admin/tokens/{id}`: the token is refused from its next
/// call on.
pub(super) async fn delete(
    ctx: &Ctx<'_>,
    id: &str,
) -> Result<http::Response<crate::Body>, ApiError> {
    let not_found = || ApiError::not_found("No admin token with this id.").with_param("id");
    if id.len() > 64 || !id.starts_with("tok_") {
        return Err(not_found());
    }
    let _write = admin_write_lock().await;
    if !ctx
        .store
        .delete_admin_token(id)
        .await
        .map_err(store_error)?
    {
        return Err(not_found());
    }
    ctx.admin_tokens.remove(id);
    super::cluster::admin_token_changed(ctx, id).await;
    tracing::info!(id, by = ctx.actor(), "admin token deleted");
    #[derive(Serialize)]
    struct Deleted<'a> {
        id: &'a str,
        deleted: bool,
    }
    json(StatusCode::OK, &Deleted { id, deleted: true })
}

/// `POST /api/v1/admin/reload`: `{reloaded: true, restart_required: […]}`,
/// or 400 `invalid_config` saying why the running config was kept.
/// A reload that applied is audited (`config.reload`, target `config`,
/// `after` = the answer); a refused one changed nothing and is not.
pub(super) async fn reload(ctx: &Ctx<'_>) -> Result<http::Response<crate::Body>, ApiError> {
    let Some(app) = ctx.app else {
        return Err(ApiError::unavailable("Reload needs a running gateway."));
    };
    tracing::info!(by = ctx.actor(), "configuration reload asked");
    match crate::reload::reload(app) {
        Ok(done) => {
            let after = serde_json::to_value(&done)
                .map_err(|e| ApiError::internal(format!("reload answer: {e}")))?;
            ctx.store
                .record_audit("config.reload", "config", None, Some(after))
                .await
                .map_err(store_error)?;
            json(StatusCode::OK, &done)
        }
        Err(why) => Err(ApiError::bad_request(
            "invalid_config",
            format!("The configuration was not reloaded; the running one is kept: {why}"),
        )
        .with_metadata(serde_json::json!({ "reloaded": false }))),
    }
}
