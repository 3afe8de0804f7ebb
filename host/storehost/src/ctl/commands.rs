//! What each `storehost ctl` subcommand asks the server and prints.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::{Client, CtlError};
use super::output::{self, outln};
use super::{CtlCommand, EventsCommand, PluginCommand, StoresCommand, TokensCommand};

/// How long `events tail` keeps trying to reconnect after its stream drops: long enough for a
/// restart of a busy host (a graceful stop waits for invocations under way and closes every
/// store; a start opens them all before it listens), which outlasted the 30 s it was.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Runs one subcommand.
pub fn run(client: &Client, json_out: bool, command: CtlCommand) -> Result<(), CtlError> {
    match command {
        CtlCommand::Stores { command } => stores(client, json_out, command),
        CtlCommand::Plugin { command } => plugin(client, json_out, command),
        CtlCommand::Events { command } => events(client, json_out, command),
        CtlCommand::Backup { id, output } => backup(client, json_out, &id, &output),
        CtlCommand::Restore {
            id,
            file,
            allow_different_store,
        } => restore(client, json_out, &id, &file, allow_different_store),
        CtlCommand::Reconcile => reconcile(client, json_out),
        CtlCommand::Tokens { command } => tokens(client, json_out, command),
    }
}

/// A store id as a path segment (the server checks the rule; this only keeps the URL intact).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn stores(client: &Client, json_out: bool, command: StoresCommand) -> Result<(), CtlError> {
    match command {
        StoresCommand::List => {
            let body = client.json(Method::GET, "/v1/stores", None)?;
            if json_out {
                output::json(&body);
                return Ok(());
            }
            let stores = body["stores"].as_array().cloned().unwrap_or_default();
            let failed = body["failed"].as_array().cloned().unwrap_or_default();
            if stores.is_empty() && failed.is_empty() {
                outln!("no stores; add one with `storehost ctl stores add ID`");
                return Ok(());
            }
            // A store whose start failed: no counts, the start's error as its failure.
            let failed_rows = failed.iter().map(|f| {
                let mut row = vec![output::cell(&f["id"]), "failed".to_owned()];
                row.extend(std::iter::repeat_n("-".to_owned(), 5));
                row.push(output::cell(&f["source"]));
                row.push(output::cell(&f["error"]));
                row
            });
            let rows: Vec<Vec<String>> = stores
                .iter()
                .map(|s| {
                    vec![
                        output::cell(&s["id"]),
                        output::cell(&s["state"]),
                        output::cell(&s["plugin"]["name"]),
                        output::cell(&s["head"]),
                        output::cell(&s["lag"]),
                        output::cell(&s["eventsProcessed"]),
                        output::cell(&s["errorsCount"]),
                        output::cell(&s["source"]),
                        s["lastFailure"]["reason"]
                            .as_str()
                            .unwrap_or("-")
                            .to_owned(),
                    ]
                })
                .chain(failed_rows)
                .collect();
            output::table(
                &[
                    "ID",
                    "STATE",
                    "PLUGIN",
                    "HEAD",
                    "LAG",
                    "PROCESSED",
                    "ERRORS",
                    "SOURCE",
                    "LAST FAILURE",
                ],
                &rows,
            );
            Ok(())
        }
        StoresCommand::Show { id } => {
            let body = client.json(Method::GET, &format!("/v1/stores/{}", segment(&id)), None)?;
            if json_out {
                output::json(&body);
            } else {
                show_store(&body);
            }
            Ok(())
        }
        StoresCommand::Add {
            ids,
            plugin,
            quotas,
            config,
        } => {
            let body = store_body(plugin, &quotas, &config)?;
            if let [id] = ids.as_slice() {
                let (view, change) = put_store(client, id, &body)?;
                if json_out {
                    output::json(&view);
                } else {
                    outln!("{}", added_line(&view, change));
                }
                return Ok(());
            }
            add_many(client, json_out, &ids, &body)
        }
        StoresCommand::Remove { id, purge } => {
            let mut path = format!("/v1/stores/{}", segment(&id));
            if purge {
                path.push_str("?purge=true");
            }
            let body = client.json(Method::DELETE, &path, None)?;
            if json_out {
                output::json(&body);
            } else {
                outln!(
                    "store {} removed; its data was {}",
                    output::cell(&body["storeId"]),
                    output::cell(&body["data"])
                );
            }
            Ok(())
        }
        StoresCommand::Pause { id } => pause_or_resume(client, json_out, &id, "pause"),
        StoresCommand::Resume { id } => pause_or_resume(client, json_out, &id, "resume"),
    }
}

fn pause_or_resume(
    client: &Client,
    json_out: bool,
    id: &str,
    action: &str,
) -> Result<(), CtlError> {
    let body = client.json(
        Method::POST,
        &format!("/v1/stores/{}/{action}", segment(id)),
        None,
    )?;
    if json_out {
        output::json(&body);
    } else {
        outln!(
            "store {} is {}",
            output::cell(&body["storeId"]),
            output::cell(&body["state"])
        );
    }
    Ok(())
}

fn key_value<'a>(flag: &str, pair: &'a str) -> Result<(&'a str, &'a str), CtlError> {
    pair.split_once('=')
        .filter(|(key, _)| !key.trim().is_empty())
        .map(|(key, value)| (key.trim(), value.trim()))
        .ok_or_else(|| {
            CtlError::Usage(format!(
                "{flag} {pair:?} must be KEY=VALUE, e.g. {flag} memory=67108864"
            ))
        })
}

fn show_store(view: &Value) {
    let plugin = format!(
        "{} (sha256 {})",
        output::cell(&view["plugin"]["name"]),
        view["plugin"]["sha256"]
            .as_str()
            .map(|s| &s[..s.len().min(16)])
            .unwrap_or("-")
    );
    let failure = match view["lastFailure"].as_object() {
        Some(failure) => format!(
            "{} at {}: {}{}",
            output::cell(&failure["reason"]),
            output::time(&failure["at"]),
            output::cell(&failure["message"]),
            failure["seq"]
                .as_u64()
                .map(|seq| format!(" (seq {seq})"))
                .unwrap_or_default()
        ),
        None => "-".into(),
    };
    let pairs_of = |value: &Value| -> String {
        value
            .as_object()
            .map(|map| {
                map.iter()
                    .map(|(k, v)| format!("{k}={}", output::cell(v)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    let usage = &view["usage"];
    output::fields(&[
        ("id", output::cell(&view["id"])),
        ("state", output::cell(&view["state"])),
        ("source", output::cell(&view["source"])),
        ("plugin", plugin),
        ("running since", output::time(&view["runningSince"])),
        (
            "log",
            format!(
                "head {}, cursor {}, lag {}",
                output::cell(&view["head"]),
                output::cell(&view["cursor"]),
                output::cell(&view["lag"])
            ),
        ),
        ("processed", output::cell(&view["eventsProcessed"])),
        ("dead-lettered", output::cell(&view["deadLettered"])),
        ("errors", output::cell(&view["errorsCount"])),
        ("last failure", failure),
        ("last activity", output::time(&view["lastActivity"])),
        (
            "usage",
            format!(
                "cpu {} ms, memory peak {}, disk {}, event log {}, files {}, page cache {}",
                output::cell(&usage["cpuMs"]),
                output::bytes(usage["memoryPeak"].as_u64().unwrap_or(0)),
                output::bytes(usage["diskBytes"].as_u64().unwrap_or(0)),
                output::bytes(usage["eventLogBytes"].as_u64().unwrap_or(0)),
                output::bytes(usage["filesBytes"].as_u64().unwrap_or(0)),
                output::bytes(usage["dbCacheBytes"].as_u64().unwrap_or(0))
            ),
        ),
        ("quotas", pairs_of(&view["quotas"])),
        ("config", pairs_of(&view["config"])),
    ]);
}

fn plugin(client: &Client, json_out: bool, command: PluginCommand) -> Result<(), CtlError> {
    match command {
        PluginCommand::Deploy { name, file } => {
            let (reader, length) = open_input(&file, "the plugin's .wasm file")?;
            let bar = progress(length, &format!("uploading {}", file.display()));
            let body = reqwest::blocking::Body::sized(ProgressReader::new(reader, &bar), length);
            let response = client.send(
                client
                    .request(Method::PUT, &format!("/v1/plugins/{}", segment(&name)))
                    .header("content-type", "application/wasm")
                    .body(body),
            );
            bar.finish_and_clear();
            let answer: Value = response?
                .json()
                .map_err(|err| client.transport_error(&err))?;
            if json_out {
                output::json(&answer);
            } else {
                let stores = answer["stores"].as_array().cloned().unwrap_or_default();
                outln!(
                    "plugin {} deployed: sha256 {}, {}; {} store(s) switch to it{}",
                    output::cell(&answer["name"]),
                    output::cell(&answer["sha256"]),
                    output::bytes(answer["size"].as_u64().unwrap_or(length)),
                    stores.len(),
                    if stores.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ": {}",
                            stores
                                .iter()
                                .map(output::cell)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
            }
            Ok(())
        }
        PluginCommand::List => {
            let body = client.json(Method::GET, "/v1/plugins", None)?;
            if json_out {
                output::json(&body);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["plugins"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    vec![
                        output::cell(&p["name"]),
                        output::cell(&p["sha256"]),
                        output::bytes(p["size"].as_u64().unwrap_or(0)),
                        output::cell(&p["stores"]),
                    ]
                })
                .collect();
            output::table(&["NAME", "SHA256", "SIZE", "STORES"], &rows);
            Ok(())
        }
    }
}

fn events(client: &Client, json_out: bool, command: EventsCommand) -> Result<(), CtlError> {
    match command {
        EventsCommand::Post {
            id,
            event_type,
            payload,
            idempotency_key,
        } => {
            let payload = match payload {
                Some(text) => serde_json::from_str::<Value>(&text).map_err(|err| {
                    CtlError::Usage(format!(
                        "PAYLOAD_JSON is not valid JSON ({err}); quote it for the shell, e.g. '{{\"key\":\"a\"}}'"
                    ))
                })?,
                None => json!({}),
            };
            let mut event = json!({"type": event_type, "payload": payload});
            if let Some(key) = idempotency_key {
                event["idempotencyKey"] = Value::String(key);
            }
            let body = client.json(
                Method::POST,
                &format!("/v1/stores/{}/events", segment(&id)),
                Some(&event),
            )?;
            if json_out {
                outln!("{body}");
            } else {
                outln!("seq {}", output::cell(&body["seq"]));
            }
            Ok(())
        }
        EventsCommand::Tail { id, after, count } => tail(client, json_out, &id, after, count),
    }
}

/// Follows `GET /v1/stores/{id}/events/stream` (Server-Sent Events); when the stream drops
/// (the server restarts, the store is restored) it reconnects with `Last-Event-ID`, so no
/// event is shown twice or skipped. It names the log's epoch it follows: after a restore
/// (another epoch, whose seqs past the backup's are handed out again) it says so and goes on
/// from the backup's last seq, so the events written since are shown too.
fn tail(
    client: &Client,
    json_out: bool,
    id: &str,
    after: Option<u64>,
    count: Option<u64>,
) -> Result<(), CtlError> {
    // The log's epoch from a read (a tenant route: a store token may tail too).
    let log_epoch = || -> Result<(Option<i64>, u64), CtlError> {
        let page = client.json(
            Method::GET,
            &format!("/v1/stores/{}/events?after=0&limit=1", segment(id)),
            None,
        )?;
        Ok((
            page["logEpoch"].as_i64(),
            page["logEpochAfter"].as_u64().unwrap_or(0),
        ))
    };
    let (mut epoch, _) = log_epoch()?;
    let mut last = match after {
        Some(after) => after,
        None => log_head(client, id)?,
    };
    let mut shown = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    let mut dropped_at: Option<std::time::Instant> = None;
    let mut connected = false;
    loop {
        let epoch_param = epoch.map(|e| format!("&logEpoch={e}")).unwrap_or_default();
        let request = client
            .stream_request(
                Method::GET,
                &format!(
                    "/v1/stores/{}/events/stream?after={last}{epoch_param}",
                    segment(id)
                ),
            )
            .header("accept", "text/event-stream")
            .header("last-event-id", last.to_string());
        let response = match client.send(request) {
            Ok(response) => response,
            Err(CtlError::Refused { code, .. }) if code == "log_replaced" => {
                let restored_up_to;
                (epoch, restored_up_to) = log_epoch()?;
                last = last.min(restored_up_to);
                eprintln!(
                    "the store's log was replaced (restored from a backup, or the store created again): following the new log from after seq {last}"
                );
                continue;
            }
            Err(CtlError::Unreachable(message)) => {
                // Once connected, a dropped server gets a while to come back (a restart).
                let since = *dropped_at.get_or_insert_with(std::time::Instant::now);
                if !connected || since.elapsed() > RECONNECT_FOR {
                    return Err(CtlError::Unreachable(message));
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            // A server starting or busy (503), or the store's followers at their limit for a
            // moment (429), when reconnecting: tried again within the same while.
            Err(
                refused @ CtlError::Refused {
                    status: 429 | 503, ..
                },
            ) if connected => {
                let since = *dropped_at.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(refused);
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(other) => return Err(other),
        };
        connected = true;
        dropped_at = None;
        let mut data = String::new();
        for line in BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            } else if line.is_empty() && !data.is_empty() {
                let event: Value = serde_json::from_str(&data).map_err(|err| {
                    CtlError::BadAnswer(format!("the event stream sent invalid JSON: {err}"))
                })?;
                data.clear();
                if let Some(seq) = event["seq"].as_u64() {
                    if seq <= last {
                        continue;
                    }
                    last = seq;
                }
                print_event(json_out, &event);
                shown += 1;
                if count.is_some_and(|count| shown >= count) {
                    return Ok(());
                }
            }
        }
        // The stream ended (server shutting down, store stopped or restored): reconnect.
        dropped_at.get_or_insert_with(std::time::Instant::now);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The seq of the log's last event, from a read of the log (a tenant route, which a store
/// token reaches: the store's view, which shows the head too, is the admin's alone).
fn log_head(client: &Client, id: &str) -> Result<u64, CtlError> {
    let page = client.json(
        Method::GET,
        &format!("/v1/stores/{}/events?after=0&limit=1", segment(id)),
        None,
    )?;
    match page["head"].as_u64() {
        Some(head) => Ok(head),
        // A server from before reads answered the head: its store view says it.
        None => Ok(
            client.json(Method::GET, &format!("/v1/stores/{}", segment(id)), None)?["head"]
                .as_u64()
                .unwrap_or(0),
        ),
    }
}

fn print_event(json_out: bool, event: &Value) {
    if json_out {
        outln!("{event}");
    } else {
        outln!(
            "{:>6}  {}  {:<6}  {}  {}",
            output::cell(&event["seq"]),
            output::time(&event["at"]),
            output::cell(&event["source"]),
            output::cell(&event["type"]),
            event["payload"]
        );
    }
}

fn backup(client: &Client, json_out: bool, id: &str, target: &Path) -> Result<(), CtlError> {
    // The file is made before the request, so a place that cannot be written to is said
    // before the server builds and sends the backup.
    let partial = partial_file(id, target)?;
    let downloaded = download_backup(client, id, partial, target);
    let Downloaded {
        written,
        first,
        last,
        cursor,
    } = downloaded?;
    if json_out {
        outln!(
            "{}",
            json!({
                "storeId": id,
                "file": target.display().to_string(),
                "bytes": written,
                "seq": {"first": first.parse::<u64>().ok(), "last": last.parse::<u64>().ok()},
                "cursor": cursor.parse::<u64>().ok(),
            })
        );
    } else {
        outln!(
            "backup of {id} written to {} ({}): events {first}..={last}, processed up to {cursor}",
            target.display(),
            output::bytes(written)
        );
    }
    Ok(())
}

/// A backup written whole: its size and what its headers said it holds.
struct Downloaded {
    written: u64,
    first: String,
    last: String,
    cursor: String,
}

/// Downloads `id`'s backup into `partial` and renames it to `target` once complete; on an
/// error `partial` is deleted as it drops.
fn download_backup(
    client: &Client,
    id: &str,
    partial: tempfile::NamedTempFile,
    target: &Path,
) -> Result<Downloaded, CtlError> {
    let response =
        client.send(client.request(Method::GET, &format!("/v1/stores/{}/backup", segment(id))))?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let (first, last, cursor) = (
        header("x-backup-seq-first"),
        header("x-backup-seq-last"),
        header("x-backup-cursor"),
    );
    let length = response.content_length();
    // A local file that cannot be written (a full disk, a file size limit) is exit 2, not
    // the server's fault: a script told "3: unreachable" would retry a healthy server.
    let cannot_write = |err: std::io::Error| {
        CtlError::Usage(format!("cannot write {}: {err}", partial.path().display()))
    };
    let bar = progress(length.unwrap_or(0), &format!("backing up {id}"));
    let written = (|| -> Result<u64, CtlError> {
        let mut writer = std::io::BufWriter::new(partial.as_file());
        let mut reader = ProgressReader::new(response, &bar);
        let mut chunk = vec![0u8; 64 << 10];
        let mut copied = 0u64;
        loop {
            let read = match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Err(CtlError::Unreachable(format!(
                        "the backup download was cut off: {err}"
                    )));
                }
            };
            writer.write_all(&chunk[..read]).map_err(cannot_write)?;
            copied += read as u64;
        }
        writer.flush().map_err(cannot_write)?;
        drop(writer);
        partial.as_file().sync_all().map_err(cannot_write)?;
        Ok(copied)
    })();
    bar.finish_and_clear();
    let written = written?;
    if let Some(length) = length.filter(|length| *length != written) {
        return Err(CtlError::Unreachable(format!(
            "the backup download was cut off after {written} of {length} bytes; try again"
        )));
    }
    partial.persist(target).map_err(|err| {
        CtlError::Usage(format!("cannot write {}: {}", target.display(), err.error))
    })?;
    Ok(Downloaded {
        written,
        first,
        last,
        cursor,
    })
}

/// A new file beside `target`, named after it, that the download lands in and that is renamed
/// onto `target` when complete (deleted if not). Its name is its own: two backups to one `-o`
/// at once (overlapping cron runs) each write their own file, where a fixed `FILE.partial`
/// was truncated by the second and renamed into place by the first with both downloads mixed
/// in it. Readable by its owner alone (0600), like the admin token: it holds all of a
/// tenant's data. `-o` names the archive itself: a directory, or a path ending in a separator,
/// is refused (before, the whole backup was downloaded beside it and then could not be
/// renamed).
fn partial_file(id: &str, target: &Path) -> Result<tempfile::NamedTempFile, CtlError> {
    let ends_in_separator = target
        .as_os_str()
        .to_string_lossy()
        .ends_with(std::path::is_separator);
    if target.is_dir() || ends_in_separator {
        return Err(CtlError::Usage(format!(
            "-o {} is a directory; -o names the archive to write, e.g. -o {}",
            target.display(),
            target.join(format!("{id}.tar.gz")).display()
        )));
    }
    let name = target
        .file_name()
        .ok_or_else(|| CtlError::Usage(format!("-o {} is not a file name", target.display())))?;
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut prefix = name.to_os_string();
    prefix.push(".");
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|err| {
            CtlError::Usage(format!(
                "cannot write {}: {err}",
                dir.join(format!("{}.*.partial", name.to_string_lossy()))
                    .display()
            ))
        })
}

fn restore(
    client: &Client,
    json_out: bool,
    id: &str,
    file: &Path,
    allow_different_store: bool,
) -> Result<(), CtlError> {
    let (reader, length) = open_input(file, "an archive `storehost ctl backup` wrote")?;
    let bar = progress(length, &format!("restoring {id}"));
    let mut path = format!("/v1/stores/{}/backup", segment(id));
    if allow_different_store {
        path.push_str("?allowDifferentStore=true");
    }
    let response = client.send(
        client
            .request(Method::PUT, &path)
            .header("content-type", "application/gzip")
            .body(reqwest::blocking::Body::sized(
                ProgressReader::new(reader, &bar),
                length,
            )),
    );
    bar.finish_and_clear();
    let response = response.map_err(|err| match err {
        CtlError::Refused {
            status,
            code,
            message,
        } if code == "store_mismatch" => CtlError::Refused {
            status,
            code,
            message: format!("{message} (with storehost ctl: --allow-different-store)"),
        },
        other => other,
    });
    let report: Value = response?
        .json()
        .map_err(|err| client.transport_error(&err))?;
    if json_out {
        output::json(&report);
        return Ok(());
    }
    outln!(
        "store {} restored from the backup of {} taken {}: events {}..={}, processed up to {}; state {}",
        output::cell(&report["storeId"]),
        output::cell(&report["restoredFrom"]["storeId"]),
        output::time(&report["restoredFrom"]["createdAt"]),
        output::cell(&report["seq"]["first"]),
        output::cell(&report["seq"]["last"]),
        output::cell(&report["cursor"]),
        output::cell(&report["state"]),
    );
    if let Some(previous) = report["previousData"].as_str() {
        outln!("the replaced data is kept in {previous}");
    }
    for warning in report["warnings"].as_array().cloned().unwrap_or_default() {
        eprintln!("warning: {}", output::cell(&warning));
    }
    Ok(())
}

fn reconcile(client: &Client, json_out: bool) -> Result<(), CtlError> {
    let body = client.json(Method::POST, "/admin/reconcile", None)?;
    if json_out {
        output::json(&body);
        return Ok(());
    }
    let (lines, warnings) = reconcile_report(&body);
    for line in lines {
        outln!("{line}");
    }
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// A pass's answer for a person: a summary line with counts and the ids (cut short) that
/// changed or wait, then as warnings what failed and why removals were held back.
fn reconcile_report(body: &Value) -> (Vec<String>, Vec<String>) {
    let result = &body["result"];
    let count = |key: &str| result[key].as_array().map_or(0, Vec::len);
    // A server from before `skippedEntries` skipped none it told of.
    let skipped = result["skippedEntries"].as_u64().unwrap_or(0);
    let mut lines = vec![format!(
        "reconcile {} in {} ms: {} added, {} removed, {} failed adds, {} failed removals, {} pending removal ({} in the registry, {} entries skipped, {} monitored); drift {}",
        output::cell(&body["status"]),
        output::cell(&body["durationMs"]),
        count("added"),
        count("removed"),
        count("failedAdds"),
        count("failedRemovals"),
        count("pendingRemovals"),
        output::cell(&result["authoritativeCount"]),
        skipped,
        output::cell(&result["monitoredCount"]),
        output::cell(&body["driftCount"]),
    )];
    for (key, what) in [
        ("added", "added"),
        ("removed", "removed"),
        ("pendingRemovals", "pending removal"),
    ] {
        if count(key) > 0 {
            lines.push(format!("{what}: {}", id_list(&result[key])));
        }
    }
    let mut warnings = Vec::new();
    for (key, what) in [
        ("failedAdds", "could not add"),
        ("failedRemovals", "could not remove"),
    ] {
        for failed in result[key].as_array().into_iter().flatten() {
            warnings.push(format!(
                "{what} {}: {}",
                output::cell(&failed["storeId"]),
                output::cell(&failed["error"])
            ));
        }
    }
    if skipped > 0 {
        warnings.push(format!(
            "{skipped} registry entries were skipped: their instanceId is missing or not a valid \
             store id, so no store was added for them; fix them in the registry"
        ));
    }
    if !result["removalsBlocked"].is_null() {
        warnings.push(output::cell(&result["removalsBlocked"]));
    }
    (lines, warnings)
}

/// Store ids from a JSON array, comma-separated: the first 20, then how many more.
fn id_list(ids: &Value) -> String {
    const SHOWN: usize = 20;
    let ids = ids.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut listed: Vec<String> = ids.iter().take(SHOWN).map(output::cell).collect();
    if ids.len() > SHOWN {
        listed.push(format!(
            "… and {} more (--json lists them all)",
            ids.len() - SHOWN
        ));
    }
    listed.join(", ")
}

fn tokens(client: &Client, json_out: bool, command: TokensCommand) -> Result<(), CtlError> {
    match command {
        TokensCommand::Create { id } => {
            let body = client.json(
                Method::POST,
                &format!("/v1/stores/{}/tokens", segment(&id)),
                None,
            )?;
            if json_out {
                output::json(&body);
            } else {
                outln!("{}", output::cell(&body["token"]));
                eprintln!(
                    "token {} of store {}: shown this once (only its hash is kept); it reaches only this store's events, queries, tasks and dead letters",
                    output::cell(&body["id"]),
                    output::cell(&body["storeId"])
                );
            }
            Ok(())
        }
        TokensCommand::List { id } => {
            let body = client.json(
                Method::GET,
                &format!("/v1/stores/{}/tokens", segment(&id)),
                None,
            )?;
            if json_out {
                output::json(&body);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|t| vec![output::cell(&t["id"]), output::time(&t["createdAt"])])
                .collect();
            output::table(&["ID", "CREATED"], &rows);
            Ok(())
        }
        TokensCommand::Revoke { id, token_id } => {
            let body = client.json(
                Method::DELETE,
                &format!("/v1/stores/{}/tokens/{token_id}", segment(&id)),
                None,
            )?;
            if json_out {
                output::json(&body);
            } else {
                outln!("token {token_id} of store {id} revoked");
            }
            Ok(())
        }
    }
}

/// Opens a local file to upload (`what` it should be, for the message), with its length. A
/// missing or unreadable file, a directory or another kind of file is a usage error: a
/// directory opened, and its read failing inside the upload looked like an unreachable server.
fn open_input(path: &Path, what: &str) -> Result<(File, u64), CtlError> {
    let cannot_read =
        |err: std::io::Error| CtlError::Usage(format!("cannot read {}: {err}", path.display()));
    // The kind is checked before opening: opening a named pipe would wait for a writer.
    let kind = std::fs::metadata(path).map_err(cannot_read)?.file_type();
    if kind.is_dir() {
        return Err(CtlError::Usage(format!(
            "{} is a directory, not a file; pass {what}",
            path.display()
        )));
    }
    if !kind.is_file() {
        return Err(CtlError::Usage(format!(
            "{} is not a regular file; pass {what}",
            path.display()
        )));
    }
    let file = File::open(path).map_err(cannot_read)?;
    let length = file.metadata().map_err(cannot_read)?.len();
    Ok((file, length))
}

/// The body of `PUT /v1/stores/{id}` from `ctl stores add`'s options.
fn store_body(
    plugin: Option<String>,
    quotas: &[String],
    config: &[String],
) -> Result<Value, CtlError> {
    let mut body = Map::new();
    if let Some(plugin) = plugin {
        body.insert("plugin".into(), Value::String(plugin));
    }
    if !quotas.is_empty() {
        let mut map = Map::new();
        for pair in quotas {
            let (key, value) = key_value("--quota", pair)?;
            map.insert(key.to_owned(), quota_value(value));
        }
        body.insert("quotas".into(), Value::Object(map));
    }
    if !config.is_empty() {
        let mut map = Map::new();
        for pair in config {
            let (key, value) = key_value("--config", pair)?;
            map.insert(key.to_owned(), Value::String(value.to_owned()));
        }
        body.insert("config".into(), Value::Object(map));
    }
    Ok(Value::Object(body))
}

/// A `--quota` value as JSON: a whole number as an integer, `null` (back to the default) as
/// null, and anything else — `64MiB`, `unmetered`, `1e3`, a number past 64 bits — as the text
/// typed, for the server to judge and quote (read as JSON, `1e3` went as the float 1000.0).
fn quota_value(typed: &str) -> Value {
    if typed == "null" {
        return Value::Null;
    }
    typed
        .parse::<u64>()
        .map(Value::from)
        .or_else(|_| typed.parse::<i64>().map(Value::from))
        .unwrap_or_else(|_| Value::String(typed.to_owned()))
}

/// `PUT /v1/stores/{id}`: the store's view, and what the PUT did to it.
fn put_store(client: &Client, id: &str, body: &Value) -> Result<(Value, &'static str), CtlError> {
    let path = format!("/v1/stores/{}", segment(id));
    let response = client.send(
        client
            .request(Method::PUT, &path)
            .timeout(Duration::from_secs(120))
            .json(body),
    )?;
    let created = response.status().as_u16() == 201;
    let view: Value = response
        .json()
        .map_err(|err| client.transport_error(&err))?;
    let change = change_of(&view, created);
    Ok((view, change))
}

/// What a PUT did: `created`, `updated` or `unchanged`, as the answer's `change` says; a
/// server from before `change` told only created (201) from the rest (200, "updated").
fn change_of(view: &Value, created: bool) -> &'static str {
    match view["change"].as_str() {
        Some("unchanged") => "unchanged",
        Some("created") => "created",
        Some("updated") => "updated",
        _ if created => "created",
        _ => "updated",
    }
}

fn added_line(view: &Value, change: &str) -> String {
    format!(
        "store {} {change} (plugin {}, state {})",
        output::cell(&view["id"]),
        output::cell(&view["plugin"]["name"]),
        output::cell(&view["state"]),
    )
}

/// `ctl stores add ID ID …`: each store in turn, a progress bar on a terminal, then what
/// happened to each. One store refused does not stop the others (exit 1 at the end); an
/// unreachable server stops at once (exit 3).
fn add_many(client: &Client, json_out: bool, ids: &[String], body: &Value) -> Result<(), CtlError> {
    let bar = count_progress(ids.len() as u64, &format!("adding {} stores", ids.len()));
    // Each store's line goes above the bar on a terminal, straight out otherwise.
    let report = |line: String, failure: bool| {
        if !bar.is_hidden() {
            bar.println(line);
            return;
        }
        if json_out {
            return;
        }
        if failure {
            eprintln!("{line}");
        } else {
            outln!("{line}");
        }
    };
    let mut results = Vec::with_capacity(ids.len());
    let mut failed = 0;
    for id in ids {
        let outcome = match put_store(client, id, body) {
            Ok((view, change)) => {
                report(added_line(&view, change), false);
                json!({"id": id, "status": change})
            }
            Err(err @ CtlError::Unreachable(_)) => {
                bar.abandon();
                return Err(err);
            }
            Err(err) => {
                failed += 1;
                report(format!("store {id} failed: {err}"), true);
                json!({"id": id, "status": "failed", "error": err.to_string()})
            }
        };
        results.push(outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if json_out {
        output::json(&Value::Array(results));
    }
    if failed > 0 {
        return Err(CtlError::Partial(format!(
            "{failed} of {} stores could not be added (see above)",
            ids.len()
        )));
    }
    if !json_out {
        outln!("{} stores added or updated", ids.len());
    }
    Ok(())
}

/// A progress bar counting items, on stderr when the output is a terminal.
fn count_progress(length: u64, message: &str) -> ProgressBar {
    if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} {eta}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message.to_owned());
    bar
}

/// A progress bar on stderr when the output is a terminal; hidden otherwise (scripts, pipes).
fn progress(length: u64, message: &str) -> ProgressBar {
    if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = if length > 0 {
        ProgressBar::new(length)
    } else {
        ProgressBar::new_spinner()
    };
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .map(|style| style.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message.to_owned());
    bar
}

/// A reader that moves a progress bar along.
struct ProgressReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R> ProgressReader<R> {
    fn new(inner: R, bar: &ProgressBar) -> Self {
        Self {
            inner,
            bar: bar.clone(),
        }
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.bar.inc(read as u64);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Blocked removals, what failed and the registry entries skipped are said, as warnings,
    /// and long id lists are cut short. Before, the arrays were printed raw inside the summary
    /// line (every id of a large pass on one line), a pass whose removals the guard held back
    /// looked clean, and skipped entries were left out.
    #[test]
    fn a_reconcile_report_says_what_was_held_back_and_counts_the_ids() {
        let added: Vec<String> = (0..25).map(|i| format!("ws-{i:02}")).collect();
        let body = json!({
            "status": "completed",
            "durationMs": 12,
            "driftCount": 29,
            "result": {
                "added": added,
                "removed": [],
                "failedAdds": [{"storeId": "ws-bad", "error": "disk full"}],
                "failedRemovals": [],
                "pendingRemovals": ["old-1", "old-2", "old-3"],
                "removalsBlocked": "removals blocked: the registry lacks 3 of the 4 running stores",
                "authoritativeCount": 26,
                "monitoredCount": 4,
                "skippedEntries": 2,
            }
        });
        let (lines, warnings) = reconcile_report(&body);
        assert_eq!(
            lines[0],
            "reconcile completed in 12 ms: 25 added, 0 removed, 1 failed adds, 0 failed removals, 3 pending removal (26 in the registry, 2 entries skipped, 4 monitored); drift 29"
        );
        assert!(
            lines[1].starts_with("added: ws-00, ws-01,")
                && lines[1].ends_with("ws-19, … and 5 more (--json lists them all)"),
            "{lines:?}"
        );
        assert_eq!(lines[2], "pending removal: old-1, old-2, old-3");
        assert_eq!(
            lines.len(),
            3,
            "nothing listed for what is empty: {lines:?}"
        );
        assert_eq!(
            warnings,
            [
                "could not add ws-bad: disk full",
                "2 registry entries were skipped: their instanceId is missing or not a valid store id, so no store was added for them; fix them in the registry",
                "removals blocked: the registry lacks 3 of the 4 running stores"
            ]
        );
    }

    /// A quota typed as a whole number of up to 64 bits goes as a JSON integer; anything else
    /// goes as typed, for the server to quote in its refusal. Before, every value was read as
    /// JSON: `1e3` went as the float 1000.0 and 99999999999999999999999 as 1e+23.
    #[test]
    fn quotas_go_as_integers_when_typed_as_whole_numbers_else_as_typed() {
        let body = store_body(
            None,
            &[
                "burst=50",
                "max_pending_events=18446744073709551615",
                "events_per_second=-5",
                "fuel_per_call=null",
                "memory=64MiB",
                "cpu_ms_per_call=1e3",
                "disk=99999999999999999999999",
                "wall_ms_per_call=1.5",
            ]
            .map(String::from),
            &[],
        )
        .unwrap();
        assert_eq!(
            body["quotas"],
            json!({
                "burst": 50,
                "max_pending_events": u64::MAX,
                "events_per_second": -5,
                "fuel_per_call": null,
                "memory": "64MiB",
                "cpu_ms_per_call": "1e3",
                "disk": "99999999999999999999999",
                "wall_ms_per_call": "1.5",
            })
        );
    }
}
