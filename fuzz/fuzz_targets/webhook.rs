//! Webhook payload parsing and Standard Webhooks signature checks on arbitrary input.
//!
//! Input layout: `id \0 timestamp \0 signature \0 body` (missing parts are absent headers).
//! Checks: nothing panics; an accepted payload names a valid store id (so no spaces around it); a
//! signature the sender computes for these exact bytes is accepted, and the same signature
//! over a different body, or under another secret, is refused.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use storehost_control::config::Secret;
use storehost_control::webhook::{
    WebhookRequest, check_payload, signature_header, verify_signature,
};

const NOW: i64 = 1_767_225_600;
const TOLERANCE: Duration = Duration::from_secs(300);

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let id = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let timestamp = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let signature = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let body = parts.next().unwrap_or(data);

    if let Ok(store_id) = check_payload(body) {
        assert!(
            storehost_store::StoreId::new(&store_id).is_ok(),
            "an accepted payload names a valid store id: {store_id:?}"
        );
    }
    for secret in [
        Secret::new("plain-shared-secret"),
        Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ] {
        // Whatever the headers say, the check answers (no panic) and an error says why.
        let request = WebhookRequest {
            secret: None,
            id,
            timestamp,
            signature,
            body,
        };
        if let Err(err) = verify_signature(&secret, &request, NOW, TOLERANCE) {
            assert!(!err.to_string().is_empty());
        }

        // A correctly signed delivery of these bytes is accepted.
        let id = id.unwrap_or("msg_fuzz");
        let ts = NOW.to_string();
        let good = signature_header(&secret, id, &ts, body);
        let signed = WebhookRequest {
            secret: None,
            id: Some(id),
            timestamp: Some(&ts),
            signature: Some(&good),
            body,
        };
        assert!(
            verify_signature(&secret, &signed, NOW, TOLERANCE).is_ok(),
            "a correct signature is refused"
        );
        // ...also among other (garbage) signatures.
        let several = format!("v1,AAAA v2,zzz {good} {}", signature.unwrap_or(""));
        let among = WebhookRequest {
            signature: Some(&several),
            ..signed
        };
        assert!(verify_signature(&secret, &among, NOW, TOLERANCE).is_ok());

        // The same signature over other bytes is refused.
        let mut other = body.to_vec();
        other.push(b'x');
        let tampered = WebhookRequest {
            body: &other,
            ..signed
        };
        assert!(
            verify_signature(&secret, &tampered, NOW, TOLERANCE).is_err(),
            "a signature over other bytes is accepted"
        );
        // Under another secret it is refused.
        assert!(
            verify_signature(&Secret::new("another-secret"), &signed, NOW, TOLERANCE).is_err(),
            "a signature made with another secret is accepted"
        );
        // Outside the tolerance it is refused.
        let late = WebhookRequest { ..signed };
        assert!(verify_signature(&secret, &late, NOW + 301, TOLERANCE).is_err());
    }
});
