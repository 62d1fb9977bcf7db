//! Standard Webhooks signing: `webhook-signature: v1,<base64 HMAC-SHA256
//! over "{id}.{timestamp}.{body}">`, the key being the base64 text after
//! `whsec_` in the endpoint's secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest decoded secret accepted: Standard Webhooks asks for 24 to 64
/// bytes; fewer than 16 is a secret that could be guessed.
const MIN_SECRET_BYTES: usize = 16;
/// Longest: anything past this is a mistake, not a key.
const MAX_SECRET_BYTES: usize = 256;

/// An endpoint's signing key, decoded once from its `whsec_…` text.
#[derive(Clone)]
pub struct WebhookSecret {
    /// The decoded HMAC key; never logged or shown.
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// Parses `whsec_` + base64. The message never repeats the text.
    pub fn parse(text: &str) -> Result<WebhookSecret, String> {
        let b64 = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or("a webhook secret starts with `whsec_` followed by base64")?;
        let key = STANDARD
            .decode(b64)
            .map_err(|_| "the part after `whsec_` is not valid base64".to_owned())?;
        if key.len() < MIN_SECRET_BYTES || key.len() > MAX_SECRET_BYTES {
            return Err(format!(
                "a webhook secret decodes to {MIN_SECRET_BYTES}..={MAX_SECRET_BYTES} bytes, this one to {}",
                key.len()
            ));
        }
        Ok(WebhookSecret { key })
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_vector() {
        let s = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_!!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert!(WebhookSecret::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
