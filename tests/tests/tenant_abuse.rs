//! A hostile tenant's plugin (`abuse`, from a security audit) against the host's own limits:
//! its error strings, the foreign keys it declares and the size of the events its followers
//! read must not let it wedge its store, take the host's memory or reach
//! the host's tables. Each test failed before its fix.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_store::{Quotas, RetryPolicy};
use storehost_tests::{TestHost, TestHostOptions, programs, urlencode};

async fn abuse_host(retry: RetryPolicy) -> TestHost {
    let host = TestHost::start_with(TestHostOptions {
        retry,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("abuse", programs::ABUSE).await;
    host
}

/// Query `name` of the `abuse` plugin with `args`: status and answer.
async fn ask(host: &TestHost, store: &str, name: &str, args: Value) -> (u16, Value) {
    host.get(&format!(
        "/v1/stores/{store}/query/{name}?args={}",
        urlencode(&args.to_string())
    ))
    .await
}

/// A plugin failing with a 9 MB error string: the message is cut to a few KB (in the store's
/// last failure, the log and the dead letter), the event is dead-lettered and the store moves
/// on. Before, the dead letter's row was too big for SQLite, so the event went back to the
/// head of the queue for ever, and every attempt logged all 9 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabytes_long_plugin_error_is_cut_and_the_store_moves_on() {
    let host = abuse_host(RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        ..RetryPolicy::default()
    })
    .await;
    host.add_store("wedge", "abuse", &[]).await;
    let bad = host
        .append("wedge", "fail", json!({"bytes": 9_000_000}))
        .await;
    let after = host.append("wedge", "ping", json!({})).await;
    host.settle("wedge").await;
    let (_, status) = host.get("/v1/stores/wedge").await;
    assert_eq!(status["cursor"], after, "it moved on");
    let message = status["lastFailure"]["message"].as_str().unwrap();
    assert!(
        message.len() < 5_000 && message.ends_with("more bytes cut)"),
        "{} bytes: {}",
        message.len(),
        &message[message.len().saturating_sub(60)..]
    );
    let (_, letters) = host.get("/v1/stores/wedge/dead-letters").await;
    assert_eq!(letters["deadLetters"][0]["seq"], bad, "{letters}");
}

/// A store whose plugin filled its disk quota records why its events fail and moves on: the
/// host's dead letters may go past the quota (by a reserve). Before, once the dead letters'
/// page was full too (at once for one whose error needs an overflow page), the dead letter's
/// insert failed, the event went back to the head of the queue and was retried for ever:
/// the event behind it (a cleanup, here a ping) never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_at_its_disk_quota_still_dead_letters_and_moves_on() {
    let host = abuse_host(RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        breaker_failures: 1_000,
        ..RetryPolicy::default()
    })
    .await;
    host.add_store_with(
        "full",
        "abuse",
        &[],
        Quotas {
            disk: 512 << 10,
            ..Quotas::default()
        },
    )
    .await;
    host.append("full", "exec", json!({"sql": "CREATE TABLE fill (b BLOB)"}))
        .await;
    // 30 KB a statement, 25 of them, then rows of 1,000 and of 50 bytes: the quota is reached
    // and what is left of it taken, down to the last page, by the rows and the failures'
    // dead letters.
    let fill = |rows: u32, bytes: u32| {
        json!({"type": "exec", "payload": {"sql": format!(
            "INSERT INTO fill SELECT randomblob({bytes}) FROM \
             (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) SELECT x FROM c)"
        )}})
    };
    let batches = [(25, 10, 3_000), (50, 1, 1_000), (50, 1, 50), (50, 1, 50)];
    for (events, rows, bytes) in batches {
        let events: Vec<Value> = (0..events).map(|_| fill(rows, bytes)).collect();
        let (status, body) = host
            .post("/v1/stores/full/events", json!({"events": events}))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let bad = host.append("full", "fail", json!({"bytes": 4_000})).await;
    let ping = host.append("full", "ping", json!({})).await;
    host.wait_for_status("full", |status| status["cursor"] == ping)
        .await;
    let (_, letters) = host.get("/v1/stores/full/dead-letters?limit=1000").await;
    let dead: Vec<u64> = letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|letter| letter["seq"].as_u64())
        .collect();
    assert!(dead.contains(&bad), "{letters}");
    let full = letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|letter| letter["reason"] == "disk_full");
    assert!(full, "the fill reached the quota: {letters}");
}

/// A `CREATE TABLE` whose foreign key names one of the host's tables is undone even when the
/// host's check cannot finish within the statement's CPU budget (the guest first declares
/// thousands of foreign keys to make it slow). Before, the interrupted check skipped the undo,
/// and the table kept its reference to `_host_outbox`: each outbox row the host deleted then
/// scanned the guest's table, on the host's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_referencing_a_host_table_is_undone_even_when_the_check_runs_out_of_time() {
    let host = abuse_host(RetryPolicy::default()).await;
    let quotas = |cpu_ms_per_call| Quotas {
        cpu_ms_per_call,
        cpu_ms_per_minute: 1_000_000,
        ..Quotas::default()
    };
    // The tables that make the check slow are made with time to spare: each check is slower
    // than the last, and all count against the call's CPU time.
    let store = host
        .add_store_with("fkx", "abuse", &[], quotas(60_000))
        .await;
    let mut filled = 0;
    for chunk in 0..24 {
        filled = host
            .append("fkx", "fk_fill", json!({"start": chunk * 20, "n": 20}))
            .await;
    }
    assert!(
        store.wait_processed(filled, Duration::from_secs(300)).await,
        "{:?}",
        store.status()
    );
    host.add_store_with("fkx", "abuse", &[], quotas(100)).await;
    let fks = vec!["FOREIGN KEY(a) REFERENCES p(id)"; 500].join(",");
    let evil = format!(
        "CREATE TABLE evil (a, x TEXT REFERENCES _host_outbox(origin) DEFERRABLE INITIALLY DEFERRED, {fks})"
    );
    let seq = host.append("fkx", "exec", json!({"sql": evil})).await;
    assert!(
        store.wait_processed(seq, Duration::from_secs(300)).await,
        "{:?}",
        store.status()
    );
    let (status, found) = ask(
        &host,
        "fkx",
        "sql",
        json!({"sql": "SELECT count(*) FROM sqlite_schema WHERE name = 'evil'"}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(
        found["out"]["rows"],
        json!(["[Value::Integer(0)]"]),
        "{found}"
    );
}

/// A page of the log stops at a few MB of payloads, however many events its `limit` asks
/// for: a store token's read of 1,000 events of 1 MB each no longer holds 1 GB (and its JSON)
/// in the host's memory. `next` goes on from the last event returned, and every event is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_big_events_stops_at_a_few_megabytes() {
    let host = abuse_host(RetryPolicy::default()).await;
    host.add_store("bigread", "abuse", &[]).await;
    let last = host
        .append("bigread", "emit_big", json!({"n": 12, "bytes": 1_000_000}))
        .await;
    host.settle("bigread").await;
    let (_, status) = host.get("/v1/stores/bigread").await;
    let head = status["head"].as_u64().unwrap();
    assert_eq!(head, last + 12, "{status}");

    let (mut after, mut pages, mut read) = (0, 0, 0);
    while after < head {
        let (status, page) = host
            .get(&format!(
                "/v1/stores/bigread/events?after={after}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200);
        let events = page["events"].as_array().unwrap();
        assert!(!events.is_empty(), "{after}");
        let bytes: usize = events.iter().map(|e| e["payload"].to_string().len()).sum();
        assert!(bytes <= 5 << 20, "a page of {bytes} bytes");
        read += events.len();
        after = page["next"].as_u64().unwrap();
        pages += 1;
    }
    assert_eq!(read as u64, head);
    assert!(pages >= 3, "{pages} pages for 12 MB");
}

/// A store's tasks are bounded (count and payload bytes), since listing them reads them all
/// into the host's memory: scheduling past 16 MiB of payloads is refused with why. Before,
/// 3,000 tasks of 60 KB made one `scheduled()` or `GET …/tasks` take 600 MB of the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cannot_schedule_past_its_tasks_room() {
    let host = abuse_host(RetryPolicy {
        attempts: 1,
        ..RetryPolicy::default()
    })
    .await;
    host.add_store("hoarder", "abuse", &[]).await;
    let seq = host
        .append("hoarder", "sched_fill", json!({"n": 300, "bytes": 60_000}))
        .await;
    host.settle("hoarder").await;
    let (_, letters) = host.get("/v1/stores/hoarder/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], seq, "{letters}");
    assert!(
        letter["error"].as_str().is_some_and(
            |e| e.contains("bytes of payloads and cron expressions, more than 16777216")
        ),
        "{letter}"
    );
    let (_, tasks) = host.get("/v1/stores/hoarder/tasks").await;
    assert_eq!(
        tasks["schedules"],
        json!([]),
        "nothing of the failed event was kept"
    );
}

/// A cron expression is at most 1 KiB: croner takes any number of empty list items, so a
/// yearly schedule padded with 4 MiB of commas was valid, and 64 of them kept 256 MiB that
/// every `GET …/tasks` (a store token is enough) read into the host's memory whole, 1.3 GB
/// for four at once, past the 16 MiB the tasks' payloads were held to. A padded expression
/// within the bound is still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_expression_is_bounded() {
    let host = abuse_host(RetryPolicy::default()).await;
    host.add_store("padder", "abuse", &[]).await;
    for pad in [4 << 20, 1_000] {
        host.append("padder", "cron", json!({"pad": pad})).await;
    }
    host.settle("padder").await;
    let answers = host.query("padder", "out", json!({})).await;
    let last = |i: usize| answers[i]["answer"]["out"]["last"].clone();
    assert!(
        last(0).as_str().is_some_and(
            |err| err.contains("a cron expression is at most 1024 bytes (got 4194315)")
        ),
        "{answers}"
    );
    assert!(
        last(1).as_i64().is_some(),
        "1,011 bytes are taken: {answers}"
    );
    let (_, tasks) = host.get("/v1/stores/padder/tasks").await;
    let specs: Vec<usize> = tasks["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"].as_str().unwrap().len())
        .collect();
    assert_eq!(specs, [1_011], "{tasks}");
}

/// Scheduling a cron expression that never matches (the host searches thousands of years for
/// its first occurrence) costs the store the time it takes, as its SQL does. Before, a call was
/// one tick of the CPU meter whatever it took, and neither CPU quota saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_cron_expression_is_charged_the_time_it_takes() {
    let host = abuse_host(RetryPolicy::default()).await;
    // The charge is measured, not the limit: the searches may take their time.
    let quotas = Quotas {
        cpu_ms_per_call: 60_000,
        ..Quotas::default()
    };
    host.add_store_with("dreamer", "abuse", &[], quotas).await;
    let cpu = |view: Value| view["usage"]["cpuMs"].as_u64().unwrap();
    let before = cpu(host.get("/v1/stores/dreamer").await.1);
    host.append(
        "dreamer",
        "cron",
        json!({"expr": "59 59 23 31 2 *", "times": 10}),
    )
    .await;
    host.settle("dreamer").await;
    let answers = host.query("dreamer", "out", json!({})).await;
    let answer = &answers[0]["answer"];
    assert!(
        answer["out"]["last"]
            .as_str()
            .is_some_and(|last| last.contains("no future occurrence")),
        "{answer}"
    );
    let took = answer["ms"].as_u64().unwrap();
    let charged = cpu(host.get("/v1/stores/dreamer").await.1) - before;
    assert!(
        charged * 2 >= took,
        "the call took {took} ms and was charged {charged} ms"
    );
}

/// A call of many statements, each well under the call's CPU quota, stops when their time
/// together reaches it: the guest's SQL counts against `cpu_ms_per_call` as its own code does,
/// and each statement may run only for what the call has left. Before, a call's time in SQL
/// was one tick of the CPU meter per statement: 50 statements of 18 ms made a 905 ms call
/// under a 100 ms quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_statements_together_are_held_to_the_calls_cpu_quota() {
    let host = abuse_host(RetryPolicy::default()).await;
    host.add_store_with(
        "looper",
        "abuse",
        &[],
        Quotas {
            cpu_ms_per_call: 200,
            ..Quotas::default()
        },
    )
    .await;
    // Each statement counts 100,000 rows: about 20 ms here, well under the quota alone; 50 of
    // them take several times the quota (and were 50 ticks of the meter before).
    let (status, answer) = ask(
        &host,
        "looper",
        "sql_loop",
        json!({"stmts": 1, "n": 100_000}),
    )
    .await;
    assert_eq!(
        (status, &answer["out"]["done"]),
        (200, &json!(1)),
        "{answer}"
    );
    let (status, answer) = ask(
        &host,
        "looper",
        "sql_loop",
        json!({"stmts": 50, "n": 100_000}),
    )
    .await;
    let text = answer.to_string();
    // The statement that runs out answers the guest an error it may report (`done` so far);
    // a call after that traps.
    assert!(
        answer["out"]["done"].is_null() && text.contains("CPU time"),
        "{status}: {text}"
    );
    let (status, _) = ask(&host, "looper", "ping", json!({})).await;
    assert_eq!(status, 200, "the store goes on");
}

/// A result is counted at what it costs the host's memory, not only its values' bytes: a
/// million rows of one `NULL` each are refused like any result past the cap. Before, they
/// counted as 8 MB and took about 100 MB of the host's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_many_small_rows_is_counted_at_what_it_costs_the_host() {
    let host = abuse_host(RetryPolicy::default()).await;
    // Time enough for the guest to take a million rows, so only the cap stops them.
    let quotas = Quotas {
        cpu_ms_per_call: 30_000,
        ..Quotas::default()
    };
    host.add_store_with("nulls", "abuse", &[], quotas).await;
    let (status, answer) = ask(&host, "nulls", "nulls", json!({"n": 1_000})).await;
    assert_eq!(
        (status, &answer["out"]["rows"]),
        (200, &json!(1_000)),
        "{answer}"
    );
    let (status, answer) = ask(&host, "nulls", "nulls", json!({"n": 1_000_000})).await;
    let error = answer["out"]["error"].as_str().unwrap_or_default();
    assert!(
        status == 200 && error.contains("larger than"),
        "{status}: {answer}"
    );
}

/// A client that asks for big answers and reads them slowly enough keeps them in the host's
/// memory (the write timeout sees its progress): 100 unread 16 MiB query answers took 1.6 GB.
/// A store's clients may leave 64 MiB of answers unread at once; past it a query gets 429
/// `answers_unread`, while another store's answers go on, and the room comes back as the
/// answers are read or their connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_leaves_unread_are_bounded_per_store() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: u64 = 16_000_000;
    let host = abuse_host(RetryPolicy::default()).await;
    // The answer takes its plugin five times its size of linear memory to make.
    let roomy = Quotas {
        memory: 256 << 20,
        ..Quotas::default()
    };
    host.add_store_with("hoarder", "abuse", &[], roomy.clone())
        .await;
    host.add_store_with("neighbour", "abuse", &[], roomy).await;
    let (token, _) = host.issue_token("hoarder").await;
    let path = |store: &str| {
        format!(
            "/v1/stores/{store}/query/pad?args={}",
            urlencode(&json!({"bytes": ANSWER}).to_string())
        )
    };
    let address = host.url.trim_start_matches("http://").to_owned();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(
                format!(
                    "GET {} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n",
                    path("hoarder")
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        // Reads nothing more, and keeps the connection.
        stalled.push(stream);
    }
    let ask_as = |store: &str, token: &str| {
        host.client
            .get(format!("{}{}", host.url, path(store)))
            .bearer_auth(token)
            .send()
    };
    let refused = ask_as("hoarder", &token).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "answers_unread", "{body}");

    let (neighbours, _) = host.issue_token("neighbour").await;
    let answered = ask_as("neighbour", &neighbours).await.unwrap();
    assert_eq!(answered.status().as_u16(), 200);
    assert!(answered.bytes().await.unwrap().len() as u64 > ANSWER);

    drop(stalled);
    let mut status = 0;
    for _ in 0..100 {
        let response = ask_as("hoarder", &token).await.unwrap();
        status = response.status().as_u16();
        if status == 200 {
            assert!(response.bytes().await.unwrap().len() as u64 > ANSWER);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status, 200,
        "the room came back once the connections closed"
    );
}
