//! The operator dashboard (`GET /`) loaded in real headless Chromium against a running host:
//! what a person sees — every store with its state and last failure, the host, reconciler and
//! config status — and that the store list needs the admin token.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the tests fail under `CI=true`
//! and are skipped with a notice elsewhere.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use storehost_tests::{TOKEN, TestHost, programs};

/// The Chromium binary: `$CHROMIUM`, or `chromium` / `chromium-browser` on the `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .flat_map(|dir| [dir.join("chromium"), dir.join("chromium-browser")])
        .find(|candidate| candidate.is_file())
}

/// Chromium, or `None` (with a notice) when it is missing outside CI; missing under CI fails.
fn browser() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        let message = "chromium is not installed: the dashboard tests load the page in Debian's \
                       headless Chromium (`apt-get install -y chromium`; .ci/run installs it)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        println!("SKIPPED: {message}");
    }
    found
}

/// Loads `url` in headless Chromium, lets its scripts run for a while, and answers the DOM as
/// the page shows it then.
async fn rendered_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=6000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes within two minutes")
    .expect("chromium runs");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// The opening tag of the element with `id`.
fn tag_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let open = dom[..start].rfind('<').expect("tag start");
    let close = start + dom[start..].find('>').expect("tag end");
    &dom[open..=close]
}

/// The text of the element with `id` (tags stripped), up to the end of that element's tag name.
fn text_of(dom: &str, id: &str) -> String {
    let tag = tag_of(dom, id);
    let name: String = tag[1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let start = dom.find(tag).expect("tag") + tag.len();
    let end = start
        + dom[start..]
            .find(&format!("</{name}>"))
            .expect("closing tag");
    strip_tags(&dom[start..end])
}

/// The row of store `id` in the stores table, as text.
fn store_row(dom: &str, id: &str) -> Option<(String, String)> {
    let marker = format!("<tr data-store-id=\"{id}\"");
    let start = dom.find(&marker)?;
    let end = start + dom[start..].find("</tr>")?;
    let row = &dom[start..end];
    let state = row
        .split("data-state=\"")
        .nth(1)?
        .split('"')
        .next()?
        .to_owned();
    Some((state, strip_tags(row)))
}

fn strip_tags(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A host with a healthy store, a paused one, and one whose plugin panics on every event (its
/// event dead-lettered).
async fn host_with_stores() -> TestHost {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.deploy("panicker", programs::PANICKER).await;
    host.add_store("alpha-orders", "writer", &[]).await;
    host.add_store("beta-billing", "panicker", &[]).await;
    host.add_store("gamma-paused", "writer", &[]).await;
    for i in 0..4 {
        host.append(
            "alpha-orders",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.append("beta-billing", "invoice.created", json!({"id": 7}))
        .await;
    let (status, body) = host
        .call(reqwest::Method::POST, "/v1/stores/gamma-paused/pause", None)
        .await;
    assert_eq!(status, 200, "{body}");
    host.settle("alpha-orders").await;
    host.wait_for_status("beta-billing", |s| s["deadLettered"] == 1)
        .await;
    host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_store_with_its_state_and_last_failure() {
    let Some(browser) = browser() else { return };
    let host = host_with_stores().await;

    let dom = rendered_dom(&browser, &format!("{}/#token={TOKEN}", host.url)).await;

    assert!(
        tag_of(&dom, "login").contains("hidden"),
        "with the token in the address, no login prompt"
    );
    let (state, row) = store_row(&dom, "alpha-orders").expect("alpha-orders is listed");
    assert_eq!(state, "running");
    assert!(row.contains("running") && row.contains("writer"), "{row}");
    assert!(
        row.contains("none"),
        "no failure shown for a healthy store: {row}"
    );
    assert!(
        row.contains("MiB / 64 MiB"),
        "memory against its quota: {row}"
    );
    assert!(row.contains("/ 1.0 GiB"), "disk against its quota: {row}");
    assert!(
        row.contains("/ 4.0 GiB"),
        "the event log against its quota: {row}"
    );
    assert!(
        row.contains("0 B / 64 MiB"),
        "its files directory against its quota: {row}"
    );

    let (state, row) = store_row(&dom, "beta-billing").expect("beta-billing is listed");
    assert_eq!(state, "running", "it moved on after dead-lettering");
    assert!(row.contains("panic"), "the failure reason: {row}");
    assert!(
        row.contains("panicker: deliberate panic"),
        "the failure message: {row}"
    );
    assert!(row.contains("event 1"), "the failed event: {row}");
    assert!(row.contains("1 dead-lettered"), "{row}");

    let (state, row) = store_row(&dom, "gamma-paused").expect("gamma-paused is listed");
    assert_eq!(state, "paused");
    assert!(row.contains("paused"), "{row}");

    assert_eq!(text_of(&dom, "host-status"), "host ok");
    assert_eq!(text_of(&dom, "store-total"), "3 stores");
    let chips = text_of(&dom, "state-chips");
    assert!(
        chips.contains("2 running") && chips.contains("1 paused"),
        "{chips}"
    );
    let reconciler = text_of(&dom, "reconciler-card");
    assert!(
        reconciler.contains("disabled") && reconciler.contains("none configured"),
        "{reconciler}"
    );
    let config = text_of(&dom, "config-card");
    assert!(
        config.contains("embedded default") && config.contains("ok"),
        "{config}"
    );
    let shown = text_of(&dom, "shown");
    assert_eq!(shown, "3 of 3 shown");
    assert!(
        tag_of(&dom, "banner").contains("hidden"),
        "no error banner: {}",
        text_of(&dom, "banner")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_dashboard_asks_for_one_and_lists_no_store() {
    let Some(browser) = browser() else { return };
    let host = host_with_stores().await;

    let dom = rendered_dom(&browser, &format!("{}/", host.url)).await;

    assert!(
        !tag_of(&dom, "login").contains("hidden"),
        "the login prompt is shown"
    );
    assert!(text_of(&dom, "login").contains("Admin token needed"));
    assert!(
        store_row(&dom, "alpha-orders").is_none(),
        "no store details without the admin token"
    );
    assert!(tag_of(&dom, "stores-section").contains("hidden"));
    assert_eq!(
        text_of(&dom, "store-total"),
        "3 stores",
        "the public health summary is shown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_with_a_clear_message() {
    let Some(browser) = browser() else { return };
    let host = host_with_stores().await;

    let dom = rendered_dom(&browser, &format!("{}/#token=not-the-token", host.url)).await;

    let refusal = text_of(&dom, "login-error");
    assert!(
        refusal.contains("The admin token was refused")
            && refusal.contains("the token is not valid for this host"),
        "the page says why: {refusal}"
    );
    assert!(!tag_of(&dom, "login-error").contains("hidden"));
    assert!(!tag_of(&dom, "login").contains("hidden"), "asked again");
    assert!(store_row(&dom, "alpha-orders").is_none());
}

/// A store whose start failed (its database unreadable) has a row of its own, in state
/// `failed` with the start's error, beside the stores that run; the host shows degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_failed_to_start_has_a_row_with_its_error() {
    let Some(browser) = browser() else { return };
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("steady-one", "writer", &[]).await;
    let broken = host.data_dir.join("stores").join("broken-two");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("events.db"), vec![0x5a; 64 * 1024]).unwrap();
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/broken-two",
            Some(json!({"plugin": "writer"})),
        )
        .await;
    assert!(status >= 500, "the start fails: {status} {body}");

    let dom = rendered_dom(&browser, &format!("{}/#token={TOKEN}", host.url)).await;
    let (state, row) = store_row(&dom, "broken-two").expect("the failed store is listed");
    assert_eq!(state, "failed", "{row}");
    assert!(row.contains("start_failed"), "{row}");
    assert!(row.contains("source: api"), "{row}");
    let (state, _) = store_row(&dom, "steady-one").expect("the other store is listed");
    assert_eq!(state, "running");
    assert_eq!(text_of(&dom, "shown"), "2 of 2 shown");
    assert!(
        text_of(&dom, "host-status").contains("degraded"),
        "{}",
        text_of(&dom, "host-status")
    );
}
