//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same property checks the fuzz targets run, on every `cargo test`.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seen = 0;
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a readable corpus directory").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check(&bytes);
        seen += 1;
    }
    assert!(seen > 0, "{} holds no corpus files", dir.display());
}

#[test]
fn inspect_request_corpus() {
    replay("inspect_request", tollgate::fuzzing::inspect_request);
}

#[test]
fn sse_meter_corpus() {
    replay("sse_meter", tollgate::fuzzing::sse_meter);
}

#[test]
fn money_roundtrip_corpus() {
    replay("money_roundtrip", tollgate::fuzzing::money_roundtrip);
}

#[test]
fn admin_request_corpus() {
    replay("admin_request", tollgate::fuzzing::admin_request);
}

#[test]
fn key_headers_corpus() {
    replay("key_headers", tollgate::fuzzing::key_headers);
}

#[test]
fn canonical_path_corpus() {
    replay("canonical_path", tollgate::fuzzing::canonical_path);
}

#[test]
fn stripe_signature_corpus() {
    replay("stripe_signature", tollgate::fuzzing::stripe_signature);
}

#[test]
fn stripe_event_corpus() {
    replay("stripe_event", tollgate::fuzzing::stripe_event);
}

#[test]
fn epay_params_corpus() {
    replay("epay_params", tollgate::fuzzing::epay_params);
}

#[test]
fn webhook_secret_corpus() {
    replay("webhook_secret", tollgate::fuzzing::webhook_secret);
}

#[test]
fn h1_answer_corpus() {
    replay("h1_answer", tollgate::fuzzing::h1_answer);
}
