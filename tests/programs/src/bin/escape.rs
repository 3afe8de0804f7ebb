//! A hostile plugin that probes the sandbox's walls and records what it reached.
//!
//! The host preopens the store's own files directory at guest path `/data`; everything else
//! must be out of reach, and guest SQL must be refused what SPEC §5 forbids.
//!
//! Events:
//! - `probe.fs {path, op, target?}` with `op`:
//!   `read` (read the file at `path`), `write` (write a few bytes to `path`), `list` (list the
//!   directory at `path`), `symlink_read` (create a symlink at `path` pointing to `target`, when
//!   given, then read through it; without `target`, read `path`, e.g. a link planted by a test),
//!   and, to press on the `files` quota: `fill` (write `bytes` bytes to a new file at `path`
//!   in 64 KiB writes), `append` (append `bytes` bytes to `path`), `grow` (set the length of a
//!   new file at `path` to `bytes`), `touch_many` (create `count` empty files in directory
//!   `path`), `hold` (open the file at `path` `count` times, keeping every handle until the
//!   probe ends), `unlink_open` (`count` times: write `bytes` bytes to a new file `<path><n>`,
//!   remove it and keep it open), `scratch` (`count` times: create `<path><n>`, remove it,
//!   then write `bytes` bytes to it through the open handle and close it), `replace_loop`
//!   (`count` times: write `bytes` bytes to
//!   `<path>.next` and rename it over `path`), `rename_dir_over` (hold `path` open and try
//!   `count` times to rename a directory over it) and `delete` (remove the file at `path`);
//! - `probe.net {op, port?}` reaches for the network through `wasi:sockets` directly: `tcp`
//!   makes a TCP socket and connects it to `127.0.0.1:<port>`, `udp` makes a UDP socket and
//!   binds it, `lookup` resolves `localhost`;
//! - `probe.sql {sql, mode?}` runs the statement with `sql::query` (`mode: "query"`, the default
//!   for statements starting with SELECT, WITH, VALUES or PRAGMA) or `sql::execute`.
//!
//! Each probe records its outcome in `probes(seq, kind, target, allowed, detail)`:
//! `allowed = 1` with what it read, listed or changed (truncated), or `allowed = 0` with the
//! error. The handler then succeeds, so the record commits. `kind` is `fs.<op>` or `sql`.
//!
//! Query `probes` → `{"probes": [{seq, kind, target, allowed, detail}]}`; query
//! `probe.sql {sql, mode?}` runs a SQL probe inside the (read-only) query and answers
//! `{allowed, detail}` without recording it.
#![forbid(unsafe_code)]

use std::fs;

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::sql::{self, SqlError};
use storehost_guest_sdk::{Event, Plugin, export_plugin, params};
use test_programs::truncate;

/// How much of what a probe read is kept in `detail`.
const DETAIL_CHARS: usize = 300;

struct Escape;

#[derive(Deserialize)]
struct FsProbe {
    path: String,
    op: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    count: u32,
}

#[derive(Deserialize)]
struct NetProbe {
    op: String,
    #[serde(default)]
    port: u16,
}

#[derive(Deserialize)]
struct SqlProbe {
    sql: String,
    #[serde(default)]
    mode: Option<String>,
}

/// What a probe reached: `Ok(what it saw)` or `Err(why it was stopped)`.
type Outcome = Result<String, String>;

fn probe_fs(probe: &FsProbe) -> Outcome {
    let path = probe.path.as_str();
    match probe.op.as_str() {
        "read" => read(path),
        "write" => {
            let bytes = b"written by the escape probe";
            fs::write(path, bytes)
                .map(|()| format!("wrote {} bytes", bytes.len()))
                .map_err(|err| format!("write failed: {err}"))
        }
        "list" => fs::read_dir(path)
            .and_then(|entries| {
                entries
                    .map(|entry| {
                        entry.map(|entry| entry.file_name().to_string_lossy().into_owned())
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .map(|mut names| {
                names.sort();
                names.join(", ")
            })
            .map_err(|err| format!("list failed: {err}")),
        "symlink_read" => {
            if let Some(target) = &probe.target {
                // `std::fs::soft_link` is the only stable way to make a symlink on WASI.
                #[allow(deprecated)]
                fs::soft_link(target, path)
                    .map_err(|err| format!("symlink {path} -> {target} failed: {err}"))?;
                return read(path).map_err(|err| format!("symlink created; {err}"));
            }
            read(path)
        }
        "fill" => fs::File::create(path)
            .map_err(|err| format!("create failed: {err}"))
            .and_then(|mut file| write_chunks(&mut file, probe.bytes)),
        "append" => fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|err| format!("open failed: {err}"))
            .and_then(|mut file| write_chunks(&mut file, probe.bytes)),
        "grow" => fs::File::create(path)
            .and_then(|file| file.set_len(probe.bytes))
            .map(|()| format!("grew to {} bytes", probe.bytes))
            .map_err(|err| format!("grow failed: {err}")),
        "touch_many" => {
            for made in 0..probe.count {
                if let Err(err) = fs::File::create(format!("{path}/{made}")) {
                    return Err(format!("created {made} files, then: {err}"));
                }
            }
            Ok(format!("created {} files", probe.count))
        }
        "hold" => {
            let mut held = Vec::new();
            for _ in 0..probe.count {
                match fs::File::open(path) {
                    Ok(file) => held.push(file),
                    Err(err) => return Err(format!("held {} files, then: {err}", held.len())),
                }
            }
            Ok(format!("held {} files", held.len()))
        }
        "unlink_open" => {
            let mut held = Vec::new();
            for made in 0..probe.count {
                let name = format!("{path}{made}");
                let kept = |err: String| format!("kept {made} removed files open, then: {err}");
                let mut file = fs::File::create(&name).map_err(|err| kept(err.to_string()))?;
                write_chunks(&mut file, probe.bytes).map_err(kept)?;
                fs::remove_file(&name).map_err(|err| kept(err.to_string()))?;
                held.push(file);
            }
            Ok(format!("kept {} removed files open", held.len()))
        }
        "scratch" => {
            // A scratch file: nameless from the start, gone once closed.
            for made in 0..probe.count {
                let name = format!("{path}{made}");
                let used = |err: String| format!("used {made} scratch files, then: {err}");
                let mut file = fs::File::create(&name).map_err(|err| used(err.to_string()))?;
                fs::remove_file(&name).map_err(|err| used(err.to_string()))?;
                write_chunks(&mut file, probe.bytes).map_err(used)?;
            }
            Ok(format!("used {} scratch files", probe.count))
        }
        "replace_loop" => {
            // Write a new version beside the file, then rename it over the file: the usual
            // way to replace a file whole.
            let next = format!("{path}.next");
            for done in 0..probe.count {
                let replaced = |err: String| format!("replaced {done} times, then: {err}");
                let mut file = fs::File::create(&next).map_err(|err| replaced(err.to_string()))?;
                write_chunks(&mut file, probe.bytes).map_err(replaced)?;
                fs::rename(&next, path).map_err(|err| replaced(err.to_string()))?;
            }
            Ok(format!("replaced {} times", probe.count))
        }
        "rename_dir_over" => {
            // Hold the file at `path` open and try, `count` times, to rename a directory over
            // it (refused: a directory cannot replace a file).
            let held = fs::File::open(path).map_err(|err| format!("open failed: {err}"))?;
            let dir = format!("{path}.d");
            fs::create_dir_all(&dir).map_err(|err| format!("mkdir failed: {err}"))?;
            let refused = (0..probe.count)
                .filter(|_| fs::rename(&dir, path).is_err())
                .count();
            drop(held);
            Ok(format!("{refused} renames refused"))
        }
        "delete" => fs::remove_file(path)
            .map(|()| "deleted".to_owned())
            .map_err(|err| format!("delete failed: {err}")),
        other => Err(format!(
            "unknown op `{other}`: use read, write, list, symlink_read, fill, append, grow, \
             touch_many, hold, unlink_open, scratch, replace_loop, rename_dir_over or delete"
        )),
    }
}

/// Writes `bytes` bytes to `file` in 64 KiB writes: `Ok` with the count, or `Err` with how
/// far it got and why it stopped.
fn write_chunks(file: &mut fs::File, bytes: u64) -> Outcome {
    use std::io::Write;
    static CHUNK: [u8; 64 << 10] = [7; 64 << 10];
    let mut written = 0;
    while written < bytes {
        let len = (bytes - written).min(CHUNK.len() as u64) as usize;
        if let Err(err) = file.write_all(&CHUNK[..len]) {
            return Err(format!("wrote {written} bytes, then: {err}"));
        }
        written += len as u64;
    }
    Ok(format!("wrote {written} bytes"))
}

fn read(path: &str) -> Outcome {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|err| format!("read failed: {err}"))
}

fn probe_sql(probe: &SqlProbe) -> Outcome {
    let as_query = match probe.mode.as_deref() {
        Some("query") => true,
        Some("execute") => false,
        Some(other) => return Err(format!("unknown mode `{other}`: use query or execute")),
        None => {
            let head = probe.sql.trim_start().to_ascii_uppercase();
            ["SELECT", "WITH", "VALUES", "PRAGMA"]
                .iter()
                .any(|keyword| head.starts_with(keyword))
        }
    };
    if as_query {
        sql::query(&probe.sql, params![])
            .map(|rows| {
                let rows: Vec<Vec<Json>> = rows
                    .iter()
                    .map(|row| {
                        (0..row.values().len())
                            .map(|index| row.get::<Json>(index).unwrap_or(Json::Null))
                            .collect()
                    })
                    .collect();
                Json::from(rows).to_string()
            })
            .map_err(|err| err.to_string())
    } else {
        sql::execute(&probe.sql, params![])
            .map(|changed| format!("{changed} row(s) changed"))
            .map_err(|err| err.to_string())
    }
}

/// What a `probe.net` reached; a refusal names the step refused (`create`, `connect`, `bind`,
/// `resolve`) and the `wasi:sockets` error code.
fn probe_net(probe: &NetProbe) -> Outcome {
    use wasi::sockets::network::{ErrorCode, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    let refused =
        |step: &'static str| move |err: ErrorCode| format!("{step} refused: {}", err.name());
    let network = wasi::sockets::instance_network::instance_network();
    let loopback = |port| {
        IpSocketAddress::Ipv4(Ipv4SocketAddress {
            port,
            address: (127, 0, 0, 1),
        })
    };
    match probe.op.as_str() {
        "tcp" => {
            let socket = wasi::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4)
                .map_err(refused("create"))?;
            socket
                .start_connect(&network, loopback(probe.port))
                .map_err(refused("connect"))?;
            socket.subscribe().block();
            socket
                .finish_connect()
                .map(|_| format!("connected to 127.0.0.1:{}", probe.port))
                .map_err(refused("connect"))
        }
        "udp" => {
            let socket = wasi::sockets::udp_create_socket::create_udp_socket(IpAddressFamily::Ipv4)
                .map_err(refused("create"))?;
            socket
                .start_bind(&network, loopback(0))
                .map_err(refused("bind"))?;
            socket.subscribe().block();
            socket
                .finish_bind()
                .map(|()| "bound a UDP socket".to_owned())
                .map_err(refused("bind"))
        }
        "lookup" => {
            let addresses = wasi::sockets::ip_name_lookup::resolve_addresses(&network, "localhost")
                .map_err(refused("resolve"))?;
            addresses.subscribe().block();
            addresses
                .resolve_next_address()
                .map(|address| format!("resolved localhost: {address:?}"))
                .map_err(refused("resolve"))
        }
        other => Err(format!("unknown net probe {other:?}")),
    }
}

fn ensure_schema() -> Result<(), SqlError> {
    sql::execute(
        "CREATE TABLE IF NOT EXISTS probes (
             seq INTEGER PRIMARY KEY, kind TEXT, target TEXT, allowed INTEGER, detail TEXT
         )",
        params![],
    )?;
    Ok(())
}

impl Plugin for Escape {
    fn handle_event(event: Event) -> Result<(), String> {
        let (kind, target, outcome) = match event.event_type.as_str() {
            "probe.fs" => {
                let probe: FsProbe = event.payload_json()?;
                let target = match &probe.target {
                    Some(link_target) => format!("{} -> {link_target}", probe.path),
                    None => probe.path.clone(),
                };
                (format!("fs.{}", probe.op), target, probe_fs(&probe))
            }
            "probe.sql" => {
                let probe: SqlProbe = event.payload_json()?;
                ("sql".to_owned(), probe.sql.clone(), probe_sql(&probe))
            }
            "probe.net" => {
                let probe: NetProbe = event.payload_json()?;
                let target = format!("127.0.0.1:{}", probe.port);
                (format!("net.{}", probe.op), target, probe_net(&probe))
            }
            _ => return Ok(()),
        };
        let (allowed, detail) = match outcome {
            Ok(seen) => (true, seen),
            Err(error) => (false, error),
        };
        ensure_schema()?;
        sql::execute(
            "INSERT INTO probes (seq, kind, target, allowed, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                event.seq as i64,
                kind,
                target,
                allowed,
                truncate(&detail, DETAIL_CHARS)
            ],
        )?;
        Ok(())
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        if name == "probe.sql" {
            // A probe from inside a query (read-only): what it reached, not recorded.
            let probe: SqlProbe = serde_json::from_value(args).map_err(|err| err.to_string())?;
            return Ok(match probe_sql(&probe) {
                Ok(seen) => json!({"allowed": true, "detail": seen}),
                Err(why) => json!({"allowed": false, "detail": why}),
            });
        }
        if name != "probes" {
            return Err(format!(
                "unknown query `{name}`; escape answers probes and probe.sql"
            ));
        }
        let rows = match sql::query(
            "SELECT seq, kind, target, allowed, detail FROM probes ORDER BY seq",
            params![],
        ) {
            Ok(rows) => rows,
            Err(err) if err.is_missing_table() => return Ok(json!({ "probes": [] })),
            Err(err) => return Err(err.into()),
        };
        let probes = rows
            .iter()
            .map(|row| {
                Ok(json!({
                    "seq": row.get::<i64>("seq")?,
                    "kind": row.get::<String>("kind")?,
                    "target": row.get::<String>("target")?,
                    "allowed": row.get::<bool>("allowed")?,
                    "detail": row.get::<String>("detail")?,
                }))
            })
            .collect::<Result<Vec<_>, SqlError>>()?;
        Ok(json!({ "probes": probes }))
    }
}

export_plugin!(Escape);

fn main() {}
