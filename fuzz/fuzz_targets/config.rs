//! The config parser on arbitrary text: it answers a config or errors that each say where
//! (a line and column inside the text) and what to do; it never panics. An accepted config
//! parses the same way a second time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storehost_control::config::parse_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_str(text, "/etc/storehost/storehost.toml") {
        Ok(config) => {
            let again = parse_str(text, "/etc/storehost/storehost.toml")
                .expect("the same text parses again");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
        Err(errors) => {
            let shown = errors.to_string();
            assert!(!shown.is_empty(), "a refused config says why");
        }
    }
});
