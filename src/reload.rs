//! Config reload (issue 12): `SIGHUP` or `POST /api/v1/admin/reload`
//! re-reads `config.toml`, validates it, builds the new routing, and swaps
//! both in one atomic store of [`App::live`]. Nothing is changed unless all
//! of that succeeded: a bad file keeps the running configuration, and the
//! answer (and the log) says why.
//!
//! In-flight requests finish on the configuration they started with: a
//! request loads one [`Live`] snapshot (an `Arc`) when it starts and reads
//! prices, routes, upstreams, plans and billing only from it. Each worker
//! rebuilds its upstream clients the first time it serves a request after
//! a swap ([`crate::proxy::WorkerProxy`]).
//!
//! Settings bound when the gateway starts (listeners, TLS files, runtime
//! mode and workers, storage, the admin-token and metrics-token variables,
//! the brute-force limiters, the upstream names `/metrics` labels) are
//! *not* swapped: a reload that changes one reports it in
//! `restart_required`, and [`App::config`] keeps the running value.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::app::App;
use crate::config::Config;
use crate::proxy::Routing;

/// What one request reads its reloadable settings from.
pub struct Live {
    /// The validated configuration this snapshot was built from. Its
    /// restart-only sections may be newer than what runs: read those from
    /// [`App::config`].
    pub config: Config,
    /// Upstreams, models, prices and route rules built from `config`.
    pub routing: Arc<Routing>,
}

/// What a reload needs besides the app: where the file is, and the mock
/// upstreams started with the gateway.
pub struct Reloader {
    /// The file the gateway was started from; `None` (a config built in
    /// code) cannot be reloaded.
    source: Option<PathBuf>,
    /// Base URLs of the in-process mock upstreams, by upstream name: they
    /// start with the gateway, so a reload can reuse them but not add one.
    mock_urls: HashMap<String, String>,
    /// One reload at a time (SIGHUP and the API may race).
    lock: Mutex<()>,
}

/// The answer of a successful reload.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Reloaded {
    /// Always true here (a refused reload is an error): the shape the API
    /// promises, `{reloaded, restart_required}`.
    pub reloaded: bool,
    /// Settings that changed in the file but apply only after a restart,
    /// as `section.field` (`server.listen`, `storage.path`, …).
    pub restart_required: Vec<String>,
}

/// Sections bound at start-up: any change in them needs a restart.
const RESTART_ONLY: &[&str] = &["server", "runtime", "storage", "admin", "metrics", "limits"];

impl Reloader {
    pub fn new(source: Option<PathBuf>, mock_urls: HashMap<String, String>) -> Reloader {
        Reloader {
            source,
            mock_urls,
            lock: Mutex::new(()),
        }
    }

    /// The mock URLs the routing of `config` may use: only for upstreams
    /// that `config` has served by the mock.
    pub fn mock_urls_for(&self, config: &Config) -> Result<HashMap<String, String>, String> {
        let mut out = HashMap::new();
        for up in config.upstreams.iter().filter(|u| u.served_by_mock()) {
            let url = self.mock_urls.get(&up.name).ok_or_else(|| {
                format!(
                    "upstream {} would be served by the built-in mock, which starts only with the gateway: restart to add it",
                    up.name
                )
            })?;
            out.insert(up.name.clone(), url.clone());
        }
        Ok(out)
    }
}

/// Re-reads the config file and swaps it in, or keeps the running one and
/// says why (`Err`, logged).
pub fn reload(app: &App) -> Result<Reloaded, String> {
    let r = try_reload(app);
    match &r {
        Ok(done) => {
            tracing::info!(restart_required = ?done.restart_required, "configuration reloaded")
        }
        Err(why) => {
            tracing::warn!(error = %why, "configuration reload refused; the running configuration is kept")
        }
    }
    r
}

fn try_reload(app: &App) -> Result<Reloaded, String> {
    let reloader = &app.reloader;
    let _one = reloader
        .lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(path) = &reloader.source else {
        return Err("this gateway was not started from a config file; nothing to reload".into());
    };
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let routing = Routing::build(&config, &reloader.mock_urls_for(&config)?)?;
    let restart_required = restart_required(&app.config, &config, &routing);
    let new = Arc::new(Live {
        config,
        routing: Arc::new(routing),
    });
    let old = app.live.swap(new.clone());
    reloaded_hook(app, &old, &new);
    Ok(Reloaded {
        reloaded: true,
        restart_required,
    })
}

/// Runs after every successful swap, with the snapshot replaced and its
/// successor. Webhooks (`[[webhooks]]`, issue 12's events part) hook in
/// here: the dispatcher reads its endpoints from `new.config` and can drop
/// state kept for endpoints `old` had.
fn reloaded_hook(_app: &App, _old: &Live, _new: &Live) {}

/// The restart-only settings `new` changes, as `section.field`.
pub fn restart_required(running: &Config, new: &Config, routing: &Routing) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(running), serde_json::to_value(new)) else {
        return vec!["(the configuration could not be compared)".into()];
    };
    let mut out = Vec::new();
    for section in RESTART_ONLY {
        let (x, y) = (&a[section], &b[section]);
        if x == y {
            continue;
        }
        match (x.as_object(), y.as_object()) {
            (Some(xo), Some(yo)) => {
                let mut fields: Vec<&String> = xo.keys().chain(yo.keys()).collect();
                fields.sort();
                fields.dedup();
                for f in fields {
                    if xo.get(f) != yo.get(f) {
                        out.push(format!("{section}.{f}"));
                    }
                }
            }
            _ => out.push((*section).to_owned()),
        }
    }
    let running_names: Vec<&str> = running.upstreams.iter().map(|u| u.name.as_str()).collect();
    let new_names: Vec<&str> = routing.upstreams.iter().map(|u| u.name.as_str()).collect();
    if running_names != new_names {
        // Requests go to the new upstreams at once; only /metrics keeps
        // counting under the start-up names until a restart.
        out.push("upstreams (names in /metrics)".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
[storage]
path = "/tmp/x"
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:9"
models = ["m"]
[models.m]
input = "1"
output = "1"
"#;

    #[test]
    fn restart_only_changes_are_named() {
        let old = Config::parse(BASE, "a.toml").unwrap();
        let text = BASE
            .replace("127.0.0.1:0", "127.0.0.1:8080")
            .replace("/tmp/x", "/tmp/y")
            .replace("input = \"1\"", "input = \"2\"")
            + "[runtime]\nmode = \"shared\"\n";
        let new = Config::parse(&text, "b.toml").unwrap();
        let routing = Routing::build(&new, &HashMap::new()).unwrap();
        assert_eq!(
            restart_required(&old, &new, &routing),
            vec!["server.listen", "runtime.mode", "storage.path"]
        );
        let same = Routing::build(&old, &HashMap::new()).unwrap();
        assert!(restart_required(&old, &old, &same).is_empty());
    }

    #[test]
    fn a_new_mock_upstream_needs_a_restart() {
        let r = Reloader::new(None, HashMap::new());
        let c = Config::parse(
            &(BASE.to_owned() + "[[upstreams]]\nname = \"m\"\nmock = true\nmodels = [\"x\"]\n"),
            "c.toml",
        )
        .unwrap();
        assert!(r.mock_urls_for(&c).unwrap_err().contains("restart"));
    }
}
