//! `storehost ctl`, the real binary, against a real `storehost serve`: stores are listed, added,
//! shown, paused and removed; events are posted and followed; a backup written to a file
//! restores; a store token from `tokens create` works as a script's `$(…)` and until revoked;
//! plugins are listed; and the exit codes scripts rely on (0 ok, 1 the server said no, 2 usage,
//! 3 cannot reach the server) hold, `reconcile` without a registry included.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_tests::process::{PROCESS_TOKEN, ServerProcess, storehost_bin};
use storehost_tests::programs;

/// The outcome of one `storehost ctl` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.stdout))
    }
}

/// `storehost` run in `dir/work` with neither STOREHOST_URL nor STOREHOST_ADMIN_TOKEN set: only
/// the arguments choose server and token.
fn command(dir: &Path) -> Command {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut command = Command::new(storehost_bin());
    command
        .current_dir(work)
        .env_remove("STOREHOST_URL")
        .env_remove("STOREHOST_ADMIN_TOKEN")
        .stdin(Stdio::null());
    command
}

/// `storehost ctl --server URL --token TOKEN ARGS…` in `dir`.
fn ctl(dir: &Path, url: &str, args: &[&str]) -> Run {
    let output = command(dir)
        .args(["ctl", "--server", url, "--token", PROCESS_TOKEN])
        .args(args)
        .output()
        .expect("run storehost ctl");
    Run {
        code: output.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `storehost ctl --json events tail STORE --after 0 --count COUNT`, running, its output piped.
fn spawn_tail(dir: &Path, url: &str, store: &str, count: &str) -> std::process::Child {
    command(dir)
        .args(["ctl", "--server", url, "--token", PROCESS_TOKEN, "--json"])
        .args(["events", "tail", store, "--after", "0", "--count", count])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ok(run: &Run) -> &Run {
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    run
}

/// A server on the embedded default, with the `writer` test plugin deployed through `ctl`.
fn server(dir: &Path) -> ServerProcess {
    let server = ServerProcess::spawn(&dir.join("data"), &[], &[]);
    let run = ctl(
        dir,
        &server.url,
        &["plugin", "deploy", "writer", programs::WRITER],
    );
    assert!(
        ok(&run).stdout.contains("plugin writer deployed"),
        "{}",
        run.stdout
    );
    server
}

#[test]
fn stores_are_listed_added_shown_paused_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();

    let list = ctl(dir, url, &["stores", "list"]);
    let header = ok(&list)
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        header.starts_with("ID") && header.contains("STATE"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("demo-alpha"), "{}", list.stdout);

    let add = ctl(
        dir,
        url,
        &[
            "stores",
            "add",
            "ctl-store",
            "--plugin",
            "writer",
            "--quota",
            "events_per_second=50",
            "--config",
            "greeting=hi",
        ],
    );
    assert!(
        ok(&add).stdout.contains("store ctl-store created"),
        "{}",
        add.stdout
    );
    // Added again as it is, nothing changes, and ctl says so (it said "updated"); a new
    // quota is an update.
    let again = ctl(
        dir,
        url,
        &[
            "stores",
            "add",
            "ctl-store",
            "--quota",
            "events_per_second=50",
        ],
    );
    assert!(
        ok(&again).stdout.contains("store ctl-store unchanged"),
        "{}",
        again.stdout
    );
    let raised = ctl(
        dir,
        url,
        &[
            "stores",
            "add",
            "ctl-store",
            "--quota",
            "events_per_second=60",
        ],
    );
    assert!(
        ok(&raised).stdout.contains("store ctl-store updated"),
        "{}",
        raised.stdout
    );
    let lowered = ctl(
        dir,
        url,
        &[
            "--json",
            "stores",
            "add",
            "ctl-store",
            "--quota",
            "events_per_second=50",
        ],
    );
    assert_eq!(ok(&lowered).json()["change"], "updated");
    let shown = ctl(dir, url, &["--json", "stores", "show", "ctl-store"]);
    let view = ok(&shown).json();
    assert_eq!(view["plugin"]["name"], "writer");
    assert_eq!(view["quotas"]["events_per_second"], 50);
    assert_eq!(view["config"]["greeting"], "hi");
    let human = ctl(dir, url, &["stores", "show", "ctl-store"]);
    assert!(ok(&human).stdout.contains("state:"), "{}", human.stdout);
    assert!(human.stdout.contains("greeting=hi"), "{}", human.stdout);
    assert!(human.stdout.contains(", files 0 B,"), "{}", human.stdout);
    assert!(human.stdout.contains(", event log "), "{}", human.stdout);

    let listed = ctl(dir, url, &["--json", "stores", "list"]);
    let ids: Vec<String> = ok(&listed).json()["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"ctl-store".to_owned()), "{ids:?}");

    let paused = ctl(dir, url, &["stores", "pause", "ctl-store"]);
    assert!(ok(&paused).stdout.contains("paused"), "{}", paused.stdout);
    let resumed = ctl(dir, url, &["stores", "resume", "ctl-store"]);
    assert!(
        ok(&resumed).stdout.contains("running"),
        "{}",
        resumed.stdout
    );

    let removed = ctl(dir, url, &["stores", "remove", "ctl-store"]);
    assert!(
        ok(&removed).stdout.contains("archived"),
        "{}",
        removed.stdout
    );
    let gone = ctl(dir, url, &["stores", "show", "ctl-store"]);
    assert_eq!(gone.code, 1, "{}", gone.stderr);
    assert!(gone.stderr.contains("store_not_found"), "{}", gone.stderr);
    // The server's hint reaches a ctl user as the ctl command (it said PUT /v1/stores/…).
    assert!(
        gone.stderr
            .contains("create it with storehost ctl stores add ctl-store")
            && !gone.stderr.contains("PUT"),
        "{}",
        gone.stderr
    );
}

#[test]
fn events_are_posted_and_followed() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "tail-store", "--plugin", "writer"],
    ));

    // The follower starts before the events exist and sees them arrive.
    let mut tail = spawn_tail(dir, url, "tail-store", "3");
    for i in 1..=3 {
        let payload = format!(r#"{{"key":"k{i}","value":{i}}}"#);
        let post = ctl(
            dir,
            url,
            &["events", "post", "tail-store", "kv.put", &payload],
        );
        assert_eq!(ok(&post).stdout.trim(), format!("seq {i}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tail did not stop after 3 events"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "tail exited with {status}");
    let lines: Vec<Value> = BufReader::new(tail.stdout.take().unwrap())
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, event) in lines.iter().enumerate() {
        assert_eq!(event["seq"], i as u64 + 1);
        assert_eq!(event["type"], "kv.put");
        assert_eq!(event["payload"]["key"], format!("k{}", i + 1));
        assert_eq!(event["source"], "api");
    }

    // The human form: one line per event with its seq, type and payload.
    let human = ctl(
        dir,
        url,
        &[
            "events",
            "tail",
            "tail-store",
            "--after",
            "2",
            "--count",
            "1",
        ],
    );
    let line = ok(&human).stdout.trim().to_owned();
    assert!(
        line.starts_with('3') && line.contains("kv.put") && line.contains("\"k3\""),
        "{line}"
    );

    let bad = ctl(
        dir,
        url,
        &["events", "post", "tail-store", "kv.put", "{not json"],
    );
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("not valid JSON"), "{}", bad.stderr);
}

#[test]
fn a_backup_file_restores_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "round-trip", "--plugin", "writer"],
    ));
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "other-store", "--plugin", "writer"],
    ));
    for i in 1..=5 {
        let payload = format!(r#"{{"key":"k{i}","value":{i}}}"#);
        ok(&ctl(
            dir,
            url,
            &["events", "post", "round-trip", "kv.put", &payload],
        ));
    }
    let file = dir.join("round-trip.tar.gz");
    let file_arg = file.to_str().unwrap();
    let backup = ctl(dir, url, &["backup", "round-trip", "-o", file_arg]);
    assert!(
        ok(&backup).stdout.contains("events 1..=5"),
        "{}",
        backup.stdout
    );
    assert!(std::fs::metadata(&file).unwrap().len() > 0);
    let partials: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");

    for i in 6..=8 {
        let payload = format!(r#"{{"key":"k{i}","value":{i}}}"#);
        ok(&ctl(
            dir,
            url,
            &["events", "post", "round-trip", "kv.put", &payload],
        ));
    }
    // A follower that has shown every event, up to 8, when the store is restored.
    let mut tail = spawn_tail(dir, url, "round-trip", "10");
    let (lines_tx, lines) = std::sync::mpsc::channel::<Value>();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = lines_tx.send(serde_json::from_str(&line.unwrap()).unwrap());
        }
    });
    let next_line = || {
        lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the tail shows the next event")
    };
    for seq in 1..=8 {
        assert_eq!(next_line()["seq"], seq);
    }

    let restore = ctl(dir, url, &["restore", "round-trip", file_arg]);
    assert!(
        ok(&restore).stdout.contains("restored"),
        "{}",
        restore.stdout
    );
    let view = ok(&ctl(dir, url, &["--json", "stores", "show", "round-trip"])).json();
    assert_eq!(view["head"], 5, "the log is back at the backup: {view}");
    let next = ctl(
        dir,
        url,
        &[
            "events",
            "post",
            "round-trip",
            "kv.put",
            r#"{"key":"k6b","value":6}"#,
        ],
    );
    assert_eq!(ok(&next).stdout.trim(), "seq 6");
    ok(&ctl(
        dir,
        url,
        &[
            "events",
            "post",
            "round-trip",
            "kv.put",
            r#"{"key":"k7b","value":7}"#,
        ],
    ));
    // The follower learns the log was replaced and shows the new events after the backup's
    // last seq: 6 and 7 again, the new ones (before, it waited past 8 and skipped them).
    for (seq, key) in [(6, "k6b"), (7, "k7b")] {
        let event = next_line();
        assert_eq!(
            (&event["seq"], &event["payload"]["key"]),
            (&json!(seq), &json!(key))
        );
    }
    let output = tail.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("log was replaced"), "{stderr}");

    let mismatch = ctl(dir, url, &["restore", "other-store", file_arg]);
    assert_eq!(mismatch.code, 1, "{}", mismatch.stderr);
    assert!(
        mismatch.stderr.contains("store_mismatch"),
        "{}",
        mismatch.stderr
    );
    assert!(
        mismatch.stderr.contains("--allow-different-store"),
        "{}",
        mismatch.stderr
    );
    let allowed = ctl(
        dir,
        url,
        &[
            "--json",
            "restore",
            "other-store",
            file_arg,
            "--allow-different-store",
        ],
    );
    assert_eq!(ok(&allowed).json()["restoredFrom"]["storeId"], "round-trip");

    let missing = ctl(dir, url, &["restore", "round-trip", "no-such-file.tar.gz"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
}

/// `backup -o` names the archive: a directory (with a trailing slash or without) is refused
/// before anything is downloaded, saying what to pass, and no `.partial` file is left beside
/// it; nor is one left when the server refuses. Before, the whole backup was downloaded to
/// `DIR.partial`, which stayed behind when renaming it onto the directory failed.
#[test]
fn a_backup_to_a_directory_is_refused_before_downloading_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(&dir.path().join("data"), &[], &[]);
    let url = server.url.as_str();
    let dir = dir.path();
    let out = dir.join("backups");
    std::fs::create_dir(&out).unwrap();
    let out_arg = out.to_str().unwrap();

    for target in [out_arg.to_owned(), format!("{out_arg}/")] {
        let run = ctl(dir, url, &["backup", "demo-alpha", "-o", &target]);
        assert_eq!(run.code, 2, "{target}: {}", run.stderr);
        assert!(
            run.stderr.contains("is a directory")
                && run.stderr.contains("backups/demo-alpha.tar.gz"),
            "{target}: {}",
            run.stderr
        );
    }
    let missing_dir = dir.join("not-yet");
    let run = ctl(
        dir,
        url,
        &[
            "backup",
            "demo-alpha",
            "-o",
            &format!("{}/", missing_dir.display()),
        ],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    let refused = ctl(
        dir,
        url,
        &[
            "backup",
            "no-such-store",
            "-o",
            &format!("{out_arg}/x.tar.gz"),
        ],
    );
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("store_not_found"),
        "{}",
        refused.stderr
    );
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .chain(std::fs::read_dir(&out).unwrap())
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
    assert!(!missing_dir.exists());

    let into = ctl(
        dir,
        url,
        &[
            "backup",
            "demo-alpha",
            "-o",
            &format!("{out_arg}/demo-alpha.tar.gz"),
        ],
    );
    assert!(ok(&into).stdout.contains("written to"), "{}", into.stdout);
    assert!(out.join("demo-alpha.tar.gz").is_file());
}

/// A file to upload that is a directory, or missing, is a usage error (exit 2) naming the path,
/// before anything is sent. Before, a directory opened, its read failed inside the upload, and
/// `plugin deploy` and `restore` exited 3 saying the server could not be reached.
#[test]
fn a_directory_or_a_missing_file_to_upload_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(&dir.path().join("data"), &[], &[]);
    let url = server.url.as_str();
    let dir = dir.path();
    let folder = dir.join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let folder = folder.to_str().unwrap();

    for (args, what) in [
        (
            vec!["plugin", "deploy", "writer", folder],
            "the plugin's .wasm file",
        ),
        (vec!["restore", "demo-alpha", folder], "an archive"),
    ] {
        let run = ctl(dir, url, &args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("{folder} is a directory, not a file"))
                && run.stderr.contains(what),
            "{args:?}: {}",
            run.stderr
        );
    }
    let missing = ctl(dir, url, &["plugin", "deploy", "writer", "no-such.wasm"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("cannot read no-such.wasm"),
        "{}",
        missing.stderr
    );
    // Nothing was deployed.
    let listed = ok(&ctl(dir, url, &["--json", "plugin", "list"])).json();
    assert!(!listed.to_string().contains("\"writer\""), "{listed}");
}

#[test]
fn exit_codes_tell_usage_refusal_and_unreachable_apart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(&dir.path().join("data"), &[], &[]);
    let dir = dir.path();

    // 3: nothing listens there.
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        ctl(
            dir,
            &format!("http://127.0.0.1:{port}"),
            &["stores", "list"],
        )
    };
    assert_eq!(unreachable.code, 3, "{}", unreachable.stderr);
    assert!(
        unreachable.stderr.contains("cannot reach"),
        "{}",
        unreachable.stderr
    );

    // 1: the server said no, with its code and message.
    let not_found = ctl(dir, &server.url, &["stores", "show", "no-such-store"]);
    assert_eq!(not_found.code, 1, "{}", not_found.stderr);
    assert!(
        not_found.stderr.contains("store_not_found"),
        "{}",
        not_found.stderr
    );
    assert!(
        not_found.stderr.contains("HTTP 404"),
        "{}",
        not_found.stderr
    );
    // A quota refused is named, with what was typed and what it accepts: `1e3` and a number
    // past 64 bits went as JSON floats (refused as "floating point `1000.0`, expected u32").
    let refused_quota = ctl(
        dir,
        &server.url,
        &[
            "stores",
            "add",
            "q-store",
            "--quota",
            "events_per_second=1e3",
            "--quota",
            "memory=99999999999999999999999",
        ],
    );
    assert_eq!(refused_quota.code, 1, "{}", refused_quota.stderr);
    for expected in [
        "invalid_quotas",
        "quotas.events_per_second: invalid type: string \"1e3\", expected a whole number from 0 to 4294967295",
        "quotas.memory: string \"99999999999999999999999\", expected a size (it does not fit in 64 bits)",
    ] {
        assert!(
            refused_quota.stderr.contains(expected),
            "{expected:?} in {}",
            refused_quota.stderr
        );
    }
    let wrong_token = command(dir)
        .args([
            "ctl",
            "--server",
            &server.url,
            "--token",
            "wrong",
            "stores",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(wrong_token.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("unauthorized"));

    // 2: usage errors, before anything is sent.
    let missing_argument = ctl(dir, &server.url, &["stores", "show"]);
    assert_eq!(missing_argument.code, 2, "{}", missing_argument.stderr);
    let bad_quota = ctl(
        dir,
        &server.url,
        &["stores", "add", "q-store", "--quota", "memory"],
    );
    assert_eq!(bad_quota.code, 2, "{}", bad_quota.stderr);
    assert!(
        bad_quota.stderr.contains("KEY=VALUE"),
        "{}",
        bad_quota.stderr
    );
    let no_token = command(dir)
        .args(["ctl", "--server", &server.url, "stores", "list"])
        .output()
        .unwrap();
    assert_eq!(no_token.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("STOREHOST_ADMIN_TOKEN"));
    // Without --token and the variable, ./data/admin.token (the embedded default's) is read.
    std::fs::create_dir_all(dir.join("work/data")).unwrap();
    std::fs::write(
        dir.join("work/data/admin.token"),
        format!("{PROCESS_TOKEN}\n"),
    )
    .unwrap();
    let token_file = command(dir)
        .args(["ctl", "--server", &server.url, "stores", "list"])
        .output()
        .unwrap();
    assert_eq!(token_file.status.code(), Some(0));
    let https = ctl(dir, "https://127.0.0.1:1", &["stores", "list"]);
    assert_eq!(https.code, 2, "{}", https.stderr);

    // The token and server also come from the environment.
    let from_env = command(dir)
        .env("STOREHOST_URL", &server.url)
        .env("STOREHOST_ADMIN_TOKEN", PROCESS_TOKEN)
        .args(["ctl", "stores", "list"])
        .output()
        .unwrap();
    assert_eq!(from_env.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&from_env.stdout).contains("demo-alpha"));
}

/// `POST path` on the server with `token` as Bearer and a JSON body; answers the status.
fn post_as(url: &str, path: &str, token: &str, body: &Value) -> u16 {
    reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .bearer_auth(token)
        .json(body)
        .send()
        .expect("request")
        .status()
        .as_u16()
}

/// `TOKEN=$(storehost ctl tokens create acme)` (the README's line) works as written: stdout
/// holds the token and nothing else, and that token appends to its store's log, is refused on
/// another store and on admin routes, and stops working once `ctl tokens revoke` revoked it
/// (the id comes from `ctl tokens list --json`).
#[test]
fn a_token_from_ctl_tokens_create_reaches_only_its_store_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    for id in ["tok-acme", "tok-other"] {
        ok(&ctl(dir, url, &["stores", "add", id, "--plugin", "writer"]));
    }

    let created = ctl(dir, url, &["tokens", "create", "tok-acme"]);
    ok(&created);
    assert_eq!(
        created.stdout.lines().count(),
        1,
        "stdout is the token alone: {:?}",
        created.stdout
    );
    let token = created.stdout.trim().to_owned();
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{token:?}"
    );
    assert_ne!(token, PROCESS_TOKEN);

    let event = serde_json::json!({"type": "kv.put", "payload": {"key": "k", "value": 1}});
    assert_eq!(
        post_as(url, "/v1/stores/tok-acme/events", &token, &event),
        202,
        "the token appends to its own store"
    );
    assert_eq!(
        post_as(url, "/v1/stores/tok-other/events", &token, &event),
        403,
        "another store's route refuses it"
    );
    let admin_route = reqwest::blocking::Client::new()
        .get(format!("{url}/v1/stores"))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(admin_route, 403, "an admin route refuses it");
    // It follows its store's events with ctl (a tenant route; ctl asks no admin route).
    let tailed = command(dir)
        .args(["ctl", "--server", url, "--token", &token, "--json"])
        .args(["events", "tail", "tok-acme", "--after", "0", "--count", "1"])
        .output()
        .unwrap();
    assert!(tailed.status.success(), "{tailed:?}");
    let line: Value = serde_json::from_slice(&tailed.stdout).unwrap();
    assert_eq!(line["seq"], 1, "{line}");

    let listed = ok(&ctl(dir, url, &["--json", "tokens", "list", "tok-acme"])).json();
    let tokens = listed["tokens"].as_array().expect("tokens").clone();
    assert_eq!(tokens.len(), 1, "{listed}");
    assert!(
        !listed.to_string().contains(&token),
        "the list never shows the token: {listed}"
    );
    let token_id = tokens[0]["id"].as_u64().expect("token id").to_string();
    let revoked = ctl(dir, url, &["tokens", "revoke", "tok-acme", &token_id]);
    assert!(
        ok(&revoked).stdout.contains("revoked"),
        "{}",
        revoked.stdout
    );
    assert_eq!(
        post_as(url, "/v1/stores/tok-acme/events", &token, &event),
        401,
        "a revoked token reaches nothing"
    );
    let listed = ok(&ctl(dir, url, &["--json", "tokens", "list", "tok-acme"])).json();
    assert_eq!(listed["tokens"], serde_json::json!([]), "{listed}");
    let again = ctl(dir, url, &["tokens", "revoke", "tok-acme", &token_id]);
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("token_not_found"), "{}", again.stderr);
}

/// `ctl events tail` without `--after` starts at the log's end, showing only the events that
/// come after it started, with the admin token and with a store token alike. Before, it read
/// where the log ends from the store's view, an admin route: with a store token it exited 1
/// with 403 "this route needs the admin token" unless `--after` was given.
#[test]
fn a_tail_without_after_shows_only_new_events_with_a_store_token_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "tail-new", "--plugin", "writer"],
    ));
    let store_token = ok(&ctl(dir, url, &["tokens", "create", "tail-new"]))
        .stdout
        .trim()
        .to_owned();
    let post = |key: &str| {
        let payload = format!(r#"{{"key":"{key}","value":1}}"#);
        ok(&ctl(
            dir,
            url,
            &["events", "post", "tail-new", "kv.put", &payload],
        ));
    };
    for i in 1..=5 {
        post(&format!("old-{i}"));
    }

    for (who, token) in [("admin", PROCESS_TOKEN), ("store", store_token.as_str())] {
        let mut tail = command(dir)
            .args(["ctl", "--server", url, "--token", token, "--json"])
            .args(["events", "tail", "tail-new", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The tail has found the log's end once it shows an event posted after; until then,
        // events posted before it did are (rightly) not shown.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut posted = 0;
        while tail.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{who}: the tail showed nothing");
            posted += 1;
            post(&format!("new-{who}-{posted}"));
            std::thread::sleep(Duration::from_millis(100));
        }
        let output = tail.wait_with_output().unwrap();
        assert!(output.status.success(), "{who}: {output:?}");
        let event: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("{who}: not one event ({err}): {output:?}"));
        let key = event["payload"]["key"].as_str().unwrap_or_default();
        assert!(
            key.starts_with(&format!("new-{who}-")),
            "{who}: the tail showed an event from before it started: {event}"
        );
    }
}

/// `ctl plugin list` shows every plugin the host has: the deployed `writer` with the SHA-256 of
/// its file and the number of stores using it, as a table and as `--json`.
#[test]
fn plugin_list_shows_the_deployed_plugin_and_its_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "plug-store", "--plugin", "writer"],
    ));
    let sha256 = storehost_tests::sha256sum(&std::fs::read(programs::WRITER).unwrap());

    let table = ctl(dir, url, &["plugin", "list"]);
    let header = ok(&table).stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("SHA256"),
        "{}",
        table.stdout
    );
    let row = table
        .stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some("writer"))
        .unwrap_or_else(|| panic!("no writer row: {}", table.stdout));
    assert!(row.contains(&sha256), "{row}");

    let listed = ok(&ctl(dir, url, &["--json", "plugin", "list"])).json();
    let plugins = listed["plugins"].as_array().expect("plugins");
    let writer = plugins
        .iter()
        .find(|p| p["name"] == "writer")
        .unwrap_or_else(|| panic!("no writer: {listed}"));
    assert_eq!(writer["sha256"], sha256.as_str(), "{writer}");
    assert_eq!(writer["stores"], 1, "{writer}");
    assert_eq!(
        writer["size"],
        std::fs::metadata(programs::WRITER).unwrap().len(),
        "{writer}"
    );
}

/// `ctl reconcile` on a server without a workspace registry fails as "the server said no"
/// (exit 1), and stderr says why: the error code and what to configure.
#[test]
fn reconcile_without_a_registry_exits_1_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(&dir.path().join("data"), &[], &[]);
    let run = ctl(dir.path(), &server.url, &["reconcile"]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("reconciler_disabled"), "{}", run.stderr);
    assert!(run.stderr.contains("HTTP 503"), "{}", run.stderr);
    assert!(
        run.stderr.contains("AUTH_WORKER_INTERNAL_URL"),
        "says what to set: {}",
        run.stderr
    );
}

/// `ctl stores add` takes many ids at once (bulk provisioning): each is added in turn with a
/// line of its own, one refused id does not stop the others (exit 1 at the end, naming it),
/// and `--json` answers what happened to each.
#[test]
fn many_stores_are_added_at_once_and_a_refused_one_does_not_stop_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();

    let run = ctl(
        dir,
        url,
        &[
            "stores", "add", "bulk-one", "bad id", "bulk-two", "--plugin", "writer",
        ],
    );
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains("store bulk-one created"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("store bulk-two created"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("store bad id failed") && run.stderr.contains("invalid_store_id"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("1 of 3 stores could not be added"),
        "{}",
        run.stderr
    );

    let run = ctl(
        dir,
        url,
        &["--json", "stores", "add", "bulk-two", "bulk-three"],
    );
    let answer = ok(&run).json();
    assert_eq!(
        answer,
        json!([{"id": "bulk-two", "status": "unchanged"}, {"id": "bulk-three", "status": "created"}])
    );
    let list = ctl(dir, url, &["--json", "stores", "list"]).json();
    let mut ids: Vec<&str> = list["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .filter(|id| id.starts_with("bulk-"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["bulk-one", "bulk-three", "bulk-two"]);
}

/// Waits up to `within` for `child` to exit.
fn exited(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A tail whose reader is gone (`| head -n1`, a closed ssh session) ends, with 0, at the next
/// event. Before, each event's write failed unseen and the tail followed the stream for
/// nobody, holding one of the store's 64 follower slots, and a pipeline waiting for it hung.
#[test]
fn a_tail_whose_reader_is_gone_ends() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "piped", "--plugin", "writer"],
    ));
    let mut tail = command(dir)
        .args(["ctl", "--server", url, "--token", PROCESS_TOKEN, "--json"])
        .args(["events", "tail", "piped", "--after", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let post = |i: u32| {
        let payload = format!(r#"{{"key":"k{i}","value":{i}}}"#);
        ok(&ctl(
            dir,
            url,
            &["events", "post", "piped", "kv.put", &payload],
        ));
    };
    post(1);
    let mut reader = BufReader::new(tail.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.contains("\"k1\""), "{first}");
    drop(reader);
    post(2);
    post(3);
    let status = exited(&mut tail, Duration::from_secs(20));
    if status.is_none() {
        let _ = tail.kill();
    }
    let status = status.expect("the tail went on after its reader was gone");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// What a tenant puts in an event's type or payload (an escape sequence that clears the
/// screen, retitles the window or writes the clipboard) reaches the operator's terminal as
/// `\uXXXX` text, in tables and in `--json` (where it is JSON's own escape: the line still
/// parses to the same type). Before, the type was printed raw.
#[test]
fn tenant_text_cannot_drive_the_operators_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "hostile", "--plugin", "writer"],
    ));
    let kind = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m";
    ok(&ctl(
        dir,
        url,
        &[
            "events",
            "post",
            "hostile",
            kind,
            r#"{"note":"\u001b[5m\u009b"}"#,
        ],
    ));
    let table = ctl(
        dir,
        url,
        &["events", "tail", "hostile", "--after", "0", "--count", "1"],
    );
    let json = ctl(
        dir,
        url,
        &[
            "--json", "events", "tail", "hostile", "--after", "0", "--count", "1",
        ],
    );
    for run in [&table, &json] {
        let shown = &ok(run).stdout;
        assert!(
            !shown.contains(['\u{1b}', '\u{7}', '\u{9b}']),
            "a control character reached the terminal: {shown:?}"
        );
        assert!(shown.contains("\\u001b"), "{shown:?}");
    }
    assert!(
        table.stdout.contains("x\\u001b]0;pwned\\u0007"),
        "{}",
        table.stdout
    );
    assert_eq!(
        json.json()["type"],
        kind,
        "the JSON line means what was sent"
    );
    assert_eq!(json.json()["payload"]["note"], "\u{1b}[5m\u{9b}");
}

/// A backup whose local file cannot be written (here a file size limit; a full disk alike)
/// exits 2 — a local file, as the exit codes say — and leaves no partial file. Before, it
/// exited 3, "the backup download was cut off", which a script reads as the server down.
#[test]
fn a_backup_that_cannot_be_written_locally_exits_2_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    ok(&ctl(
        dir,
        url,
        &["stores", "add", "big", "--plugin", "writer"],
    ));
    // Payloads that do not compress: the archive is far over the limit below.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..40 {
        let noise: String = (0..4_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect();
        let payload = format!(r#"{{"key":"k{i}","value":"{noise}"}}"#);
        ok(&ctl(
            dir,
            url,
            &["events", "post", "big", "kv.put", &payload],
        ));
    }
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let target = out.join("big.tar.gz");
    let script = format!(
        "trap '' XFSZ; ulimit -f 16; exec \"$0\" ctl --server {url} --token {PROCESS_TOKEN} backup big -o {}",
        target.display()
    );
    let output = Command::new("sh")
        .args(["-c", &script])
        .arg(storehost_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot write"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Without the limit the same backup is written, and only its owner can read it.
    let backup = ctl(dir, url, &["backup", "big", "-o", target.to_str().unwrap()]);
    ok(&backup);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

/// Each backup downloads into a file of its own: one named `FILE.partial` beside `-o` (a
/// backup under way at the same time, before) is neither truncated nor renamed onto the
/// archive. Before, a second backup truncated the first's `.partial` and the first renamed it
/// into place with both downloads mixed in it.
#[test]
fn a_backup_leaves_another_backups_partial_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let url = server.url.as_str();
    let dir = dir.path();
    let target = dir.join("demo.tar.gz");
    let other = dir.join("demo.tar.gz.partial");
    std::fs::write(&other, b"another download under way").unwrap();
    ok(&ctl(
        dir,
        url,
        &["backup", "demo-alpha", "-o", target.to_str().unwrap()],
    ));
    assert_eq!(
        std::fs::read(&other).unwrap(),
        b"another download under way"
    );
    let archive = std::fs::read(&target).unwrap();
    assert_eq!(&archive[..2], &[0x1f, 0x8b], "a gzip archive");
    let restore = ctl(
        dir,
        url,
        &["restore", "demo-alpha", target.to_str().unwrap()],
    );
    ok(&restore);
}
