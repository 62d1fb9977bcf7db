//! `[cluster]`: the settings of a node that shares its keys, accounts and
//! money with other nodes over PostgreSQL. Parsed once into typed values.

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::Dur;
use crate::money::Pico;

/// `[cluster]` in `config.toml`. Without the table the gateway runs alone
/// on its embedded store, as it always did.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The environment variable holding the `postgres://` URL (a secret:
    /// it is never written in the file).
    pub postgres_url_env: String,
    /// This node's name: on its leases and usage records; unique per node.
    pub node_id: String,
    /// How much of an account's remaining credit one node takes at a time:
    /// a share (`"5%"`) or an amount in USD (`"0.50"`).
    pub lease: LeaseSize,
    /// The smallest slice worth a database round trip (USD); below about
    /// twice this much remaining, slices shrink to the one request.
    pub lease_floor: Pico,
    /// The largest slice one node holds (USD): what a crashed node can
    /// keep from the others until `lease_ttl`.
    pub lease_ceiling: Pico,
    /// How long a lease lives without renewal: a node killed with its lease
    /// gives it back to the others after this long.
    pub lease_ttl: Dur,
    /// How soon an admin write on one node is seen by the others (with
    /// LISTEN/NOTIFY usually sooner); also the settle and renewal tick.
    pub sync_interval: Dur,
    /// Connections to PostgreSQL this node keeps at most.
    pub pool_size: usize,
    /// PEM file of the CA that signed the database's certificate (a private
    /// CA), trusted besides the public roots when TLS is used.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            postgres_url_env: "TOLLGATE_POSTGRES_URL".to_owned(),
            node_id: String::new(),
            lease: LeaseSize::Share(50_000),
            lease_floor: Pico(10_000_000_000),      // 0.01 USD
            lease_ceiling: Pico(1_000_000_000_000), // 1 USD
            lease_ttl: Dur::secs(30),
            sync_interval: Dur::secs(1),
            pool_size: 8,
            ca_file: None,
        }
    }
}

/// `lease`: a share of what remains, or a fixed amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseSize {
    /// Parts per million of the remaining credit (`"5%"` = 50 000).
    Share(i64),
    /// A fixed amount.
    Amount(Pico),
}

impl LeaseSize {
    pub fn parse(text: &str) -> Result<LeaseSize, String> {
        let t = text.trim();
        if let Some(pct) = t.strip_suffix('%') {
            // Percent with up to four decimals, exactly: "2.5%" = 25 000 ppm.
            let p = Pico::parse_usd(pct.trim()).map_err(|e| {
                format!("cluster.lease {text:?}: expected e.g. \"5%\" or \"0.50\": {e}")
            })?;
            let ppm = p.0 / 100_000_000; // pico-percent → ppm
            if !(1..=1_000_000).contains(&ppm) || p.0 % 100_000_000 != 0 {
                return Err(format!(
                    "cluster.lease {text:?}: a share must be between 0.0001% and 100%"
                ));
            }
            return Ok(LeaseSize::Share(ppm));
        }
        let a = Pico::parse_usd(t).map_err(|e| {
            format!("cluster.lease {text:?}: expected e.g. \"5%\" or \"0.50\": {e}")
        })?;
        if a.0 <= 0 {
            return Err(format!("cluster.lease {text:?} must be greater than 0"));
        }
        Ok(LeaseSize::Amount(a))
    }
}

impl<'de> Deserialize<'de> for LeaseSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        LeaseSize::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for LeaseSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LeaseSize::Share(ppm) => {
                let whole = ppm / 10_000;
                let frac = ppm % 10_000;
                if frac == 0 {
                    s.collect_str(&format_args!("{whole}%"))
                } else {
                    let f = format!("{frac:04}");
                    s.collect_str(&format_args!("{whole}.{}%", f.trim_end_matches('0')))
                }
            }
            LeaseSize::Amount(a) => s.collect_str(a),
        }
    }
}

impl ClusterConfig {
    /// Checks what serde cannot: names, bounds, and that the URL is set.
    pub fn validate(&self) -> Result<(), String> {
        if self.postgres_url_env.is_empty() {
            return Err("cluster.postgres_url_env must name an environment variable".to_owned());
        }
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || !self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(format!(
                "cluster.node_id {:?} must be 1 to 64 characters of [A-Za-z0-9._-], unique per node",
                self.node_id
            ));
        }
        if self.lease_floor.0 <= 0 || self.lease_ceiling < self.lease_floor {
            return Err(format!(
                "cluster.lease_floor ({}) must be > 0 and at most cluster.lease_ceiling ({})",
                self.lease_floor, self.lease_ceiling
            ));
        }
        if self.lease_ttl.as_millis() < 1_000 {
            return Err(format!(
                "cluster.lease_ttl ({}) must be at least 1s",
                self.lease_ttl
            ));
        }
        if self.sync_interval.as_millis() < 50 || self.sync_interval >= self.lease_ttl {
            return Err(format!(
                "cluster.sync_interval ({}) must be at least 50ms and below cluster.lease_ttl ({}): leases are renewed on that tick",
                self.sync_interval, self.lease_ttl
            ));
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err("cluster.pool_size must be between 1 and 256".to_owned());
        }
        Ok(())
    }

    /// The PostgreSQL URL from the environment.
    pub fn postgres_url(&self) -> Result<String, String> {
        match std::env::var(&self.postgres_url_env) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(format!(
                "cluster: the environment variable {} (cluster.postgres_url_env) must hold the postgres:// URL",
                self.postgres_url_env
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig, String> {
        let c: ClusterConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn the_checks_table_parses_with_defaults() {
        let c = parse(
            "postgres_url_env = \"TOLLGATE_POSTGRES_URL\"\nnode_id = \"node-1\"\nlease_ttl = \"5s\"\nsync_interval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.lease_ttl, Dur::secs(5));
        assert_eq!(c.sync_interval, Dur::secs(1));
        assert_eq!(c.lease, LeaseSize::Share(50_000));
    }

    #[test]
    fn lease_sizes() {
        assert_eq!(LeaseSize::parse("5%").unwrap(), LeaseSize::Share(50_000));
        assert_eq!(LeaseSize::parse("2.5%").unwrap(), LeaseSize::Share(25_000));
        assert_eq!(
            LeaseSize::parse("100%").unwrap(),
            LeaseSize::Share(1_000_000)
        );
        assert_eq!(
            LeaseSize::parse("0.50").unwrap(),
            LeaseSize::Amount(Pico(500_000_000_000))
        );
        assert!(LeaseSize::parse("0%").is_err());
        assert!(LeaseSize::parse("101%").is_err());
        assert!(LeaseSize::parse("-1").is_err());
        assert!(LeaseSize::parse("lots").is_err());
        let c = parse("node_id = \"a\"\nlease = \"0.25\"\nlease_floor = \"0.001\"").unwrap();
        assert_eq!(c.lease, LeaseSize::Amount(Pico(250_000_000_000)));
        assert_eq!(c.lease_floor, Pico(1_000_000_000));
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(parse("").unwrap_err().contains("node_id"));
        assert!(parse("node_id = \"a b\"").unwrap_err().contains("node_id"));
        assert!(
            parse("node_id = \"a\"\nsync_interval = \"30s\"\nlease_ttl = \"5s\"")
                .unwrap_err()
                .contains("sync_interval")
        );
        assert!(
            parse("node_id = \"a\"\nlease_ttl = \"100ms\"")
                .unwrap_err()
                .contains("lease_ttl")
        );
        assert!(
            parse("node_id = \"a\"\nlease_floor = \"2\"")
                .unwrap_err()
                .contains("lease_floor")
        );
        assert!(parse("node_id = \"a\"\nleese = \"1%\"").is_err());
    }
}
