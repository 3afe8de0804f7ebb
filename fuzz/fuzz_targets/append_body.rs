//! The event append body (`{"type","payload","idempotencyKey"}` or `{"events":[...]}`) on
//! arbitrary bytes, parsed as the route does: never a panic; a refusal is a 400 (`invalid_json`
//! exactly when the bytes are not JSON); an accepted
//! body holds 1 to 1,000 events, each with a type and key of 1 to 200 characters and a payload
//! that is valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storehost_api::routes::events::{MAX_EVENTS_PER_REQUEST, parse_append};

fuzz_target!(|data: &[u8]| {
    match parse_append(data) {
        Ok((_batch, events)) => {
            assert!(!events.is_empty() && events.len() <= MAX_EVENTS_PER_REQUEST);
            for event in events {
                assert!(!event.event_type.is_empty() && event.event_type.len() <= 200);
                if let Some(key) = &event.idempotency_key {
                    assert!(!key.is_empty() && key.len() <= 200);
                }
                serde_json::from_str::<serde_json::Value>(&event.payload)
                    .expect("the stored payload is JSON");
            }
        }
        Err(err) => {
            assert_eq!(err.status().as_u16(), 400, "{err:?}");
            // Only a body that is not JSON at all is called that.
            let not_json = serde_json::from_slice::<serde_json::Value>(data).is_err();
            assert_eq!(err.code() == "invalid_json", not_json, "{err:?}");
        }
    }
});
