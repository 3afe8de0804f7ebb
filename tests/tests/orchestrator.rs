//! The orchestrator starting many stores at once (what a config edit, a start and a restore
//! do): every store gets the answer `ensure_running` would give it, in order, and `max_stores`
//! holds across the batches opened in parallel. Also its seam to several hosts: placement and
//! where desired state is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde_json::json;
use storehost_control::config::StoreSpec;
use storehost_control::{
    ControlError, DesiredState, Placed, Placement, Provisioned, Seams, StoreSource,
};
use storehost_store::StoreId;
use storehost_tests::TestHost;
use storehost_tests::control::ControlHostOptions;

fn id(name: &str) -> StoreId {
    StoreId::new(name).unwrap()
}

/// A host on the data directory `data` with `writer` deployed: calling it again after a
/// stop is a restart.
async fn host_on(data: &std::path::Path) -> TestHost {
    use storehost_tests::{TestHostOptions, programs};
    TestHost::start_configured(
        TestHostOptions {
            data_dir: Some(data.to_owned()),
            ..TestHostOptions::default()
        },
        &[("writer", programs::WRITER)],
        |_, state| state,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stores_at_once_get_the_answers_one_at_a_time_would_and_respect_max_stores() {
    let host = TestHost::start_control(
        ControlHostOptions {
            max_stores: 40,
            ..ControlHostOptions::default()
        },
        |_, state| state,
    )
    .await;
    let orchestrator = &host.orchestrator;
    let spec = orchestrator.settings().defaults.clone();
    for name in ["kept", "changed"] {
        let started = orchestrator
            .ensure_running(&id(name), spec.clone(), StoreSource::Api)
            .await
            .unwrap();
        assert_eq!(started, Provisioned::Created);
    }

    let mut changed = spec.clone();
    changed.config.insert("colour".into(), "blue".into());
    let mut unknown = spec.clone();
    unknown.plugin = "nope".into();
    // The same source as before: a config declaring them would take them over (an update of
    // its own, tested in config_reload.rs).
    let mut wanted = vec![
        (id("kept"), spec.clone(), StoreSource::Api),
        (id("changed"), changed.clone(), StoreSource::Api),
        (id("typo"), unknown, StoreSource::Config),
    ];
    wanted.extend((0..50).map(|i| {
        (
            id(&format!("new-{i:02}")),
            spec.clone(),
            StoreSource::Config,
        )
    }));
    let names: Vec<StoreId> = wanted.iter().map(|(id, _, _)| id.clone()).collect();

    let answers = orchestrator.ensure_running_many(wanted).await;
    let answered: Vec<StoreId> = answers.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(answered, names, "one answer per store, in the order asked");
    assert!(
        matches!(answers[0].1, Ok(Provisioned::Unchanged)),
        "{:?}",
        answers[0]
    );
    assert!(
        matches!(answers[1].1, Ok(Provisioned::Updated)),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(answers[2].1, Err(ControlError::UnknownPlugin { .. })),
        "{:?}",
        answers[2]
    );
    // 2 stores ran before; 38 more fit, the other 12 are refused (across two batches).
    let created = answers[3..]
        .iter()
        .filter(|(_, answer)| matches!(answer, Ok(Provisioned::Created)))
        .count();
    let refused = answers[3..]
        .iter()
        .filter(|(_, answer)| matches!(answer, Err(ControlError::AtCapacity { max: 40 })))
        .count();
    assert_eq!((created, refused), (38, 12), "{answers:?}");
    assert!(
        answers[3..41]
            .iter()
            .all(|(_, a)| matches!(a, Ok(Provisioned::Created))),
        "the first that fit are the ones started"
    );
    assert_eq!(orchestrator.len().await, 40);
    let (kept_spec, _) = orchestrator.spec(&id("changed")).await.unwrap();
    assert_eq!(kept_spec, changed, "the change applied");

    // Every store opened in parallel is a working store.
    for i in 0..38 {
        let name = format!("new-{i:02}");
        host.append(&name, "kv.put", json!({"key": "k", "value": i}))
            .await;
    }
    for i in 0..38 {
        let name = format!("new-{i:02}");
        host.settle(&name).await;
        assert_eq!(
            host.query(&name, "get", json!({"key": "k"})).await["value"],
            i.to_string(),
            "{name} applied its event"
        );
    }
    let (_, status) = host.get("/v1/stores/new-00").await;
    assert_eq!(status["state"], "running", "{status}");
}

/// A store added at run time is restored at a start with that start's defaults for what it
/// did not set itself (host.db keeps its own settings apart), and keeps what it set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_other_defaults_gives_them_to_the_stores_added_at_run_time() {
    use storehost_control::config::OwnSettings;
    use storehost_store::Quotas;
    use storehost_tests::{TestHostOptions, programs};
    let dir = tempfile::tempdir().unwrap();
    let start = |memory: u64| {
        TestHost::start_configured(
            TestHostOptions {
                data_dir: Some(dir.path().join("data")),
                quotas: Quotas {
                    memory,
                    ..Quotas::default()
                },
                ..TestHostOptions::default()
            },
            &[("writer", programs::WRITER)],
            |_, state| state,
        )
    };
    let first = start(32 << 20).await;
    let orchestrator = &first.orchestrator;
    orchestrator
        .ensure_running(
            &id("follows"),
            orchestrator.spec_with(OwnSettings::default()),
            StoreSource::Webhook,
        )
        .await
        .unwrap();
    let mut own = OwnSettings::default();
    let chosen = Quotas {
        memory: 24 << 20,
        ..Quotas::default()
    };
    own.set_quotas(&chosen, &["memory".to_owned()]);
    orchestrator
        .ensure_running(
            &id("chooses"),
            orchestrator.spec_with(own),
            StoreSource::Api,
        )
        .await
        .unwrap();
    first.stop().await;

    let second = start(48 << 20).await;
    assert_eq!(second.orchestrator.restore_persisted().await.unwrap(), 2);
    let memory = |view: serde_json::Value| view["quotas"]["memory"].clone();
    assert_eq!(
        memory(second.get("/v1/stores/follows").await.1),
        json!(48 << 20)
    );
    assert_eq!(
        memory(second.get("/v1/stores/chooses").await.1),
        json!(24 << 20)
    );
}

/// A store whose restore failed starts again, on the next `PUT`, from what it had set itself
/// and with its source: not from the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_a_store_whose_restore_failed_keeps_what_it_had_set() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = || host_on(&data);
    let first = start().await;
    let (status, body) = first
        .call(
            reqwest::Method::PUT,
            "/v1/stores/kept-own",
            Some(json!({"quotas": {"cpu_ms_per_call": 77}, "config": {"mode": "x"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    first.stop().await;

    // Its directory is out of the way at the start: the restore fails.
    let store_dir = data.join("stores/kept-own");
    let aside = data.join("kept-own.aside");
    std::fs::rename(&store_dir, &aside).unwrap();
    std::fs::write(&store_dir, b"in the way").unwrap();
    let second = start().await;
    assert_eq!(second.orchestrator.restore_persisted().await.unwrap(), 0);
    std::fs::remove_file(&store_dir).unwrap();
    std::fs::rename(&aside, &store_dir).unwrap();

    let (status, view) = second
        .call(reqwest::Method::PUT, "/v1/stores/kept-own", None)
        .await;
    assert_eq!(status, 201, "{view}");
    assert_eq!(view["quotas"]["cpu_ms_per_call"], 77, "{view}");
    assert_eq!(view["config"]["mode"], "x", "{view}");

    // `null` hands a quota back to the defaults; an unknown name is still refused.
    let (status, view) = second
        .call(
            reqwest::Method::PUT,
            "/v1/stores/kept-own",
            Some(json!({"quotas": {"cpu_ms_per_call": null}})),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        view["quotas"]["cpu_ms_per_call"],
        storehost_store::Quotas::default().cpu_ms_per_call,
        "{view}"
    );
    let (status, body) = second
        .call(
            reqwest::Method::PUT,
            "/v1/stores/kept-own",
            Some(json!({"quotas": {"cpu_ms_per_cal": null}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

/// `PUT`s racing each other on one store each change one quota: every change stays. Before,
/// each read the store's own settings outside the change lock, and the last to apply put back
/// the values the others had just changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_puts_on_one_store_all_keep_their_changes() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/raced", None)
        .await;
    assert_eq!(status, 201, "{body}");
    let changes = [
        ("cpu_ms_per_call", 301),
        ("wall_ms_per_call", 30_002),
        ("cpu_ms_per_minute", 60_003),
        ("events_per_second", 304),
        ("burst", 305),
        ("max_pending_events", 10_006),
        ("llm_calls_per_minute", 307),
    ];
    for round in 0..3 {
        let puts = changes.iter().map(|(name, value)| {
            let body = json!({"quotas": {*name: value + round}});
            host.call(reqwest::Method::PUT, "/v1/stores/raced", Some(body))
        });
        for (status, body) in futures::future::join_all(puts).await {
            assert_eq!(status, 200, "{body}");
        }
        let (_, view) = host.get("/v1/stores/raced").await;
        for (name, value) in changes {
            assert_eq!(
                view["quotas"][name],
                value + round,
                "round {round}: every racing PUT's change stays: {view}"
            );
        }
    }
}

/// Once the host shuts down (a signal, even during start-up), no store starts and no store's
/// settings change: every store still to start answers `ShuttingDown`, and a PUT that reaches
/// the orchestrator gets 503 `shutting_down` instead of starting or changing a store that the
/// shutdown then leaves running or half-changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_shutting_down_starts_and_changes_no_store() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/before", None)
        .await;
    assert_eq!(status, 201, "{body}");

    let orchestrator = &host.orchestrator;
    orchestrator.stop_starting();
    let spec = orchestrator.settings().defaults.clone();
    let wanted: Vec<_> = (0..40)
        .map(|i| {
            (
                id(&format!("late-{i:02}")),
                spec.clone(),
                StoreSource::Config,
            )
        })
        .collect();
    let answers = orchestrator.ensure_running_many(wanted).await;
    assert_eq!(answers.len(), 40, "one answer per store asked");
    for (store, answer) in &answers {
        assert!(
            matches!(answer, Err(ControlError::ShuttingDown)),
            "{store}: {answer:?}"
        );
        let (status, body) = host.get(&format!("/v1/stores/{store}")).await;
        assert_eq!(status, 404, "{store} was not started: {body}");
    }

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/before",
            Some(json!({"quotas": {"burst": 77}})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    let (_, view) = host.get("/v1/stores/before").await;
    assert_ne!(
        view["quotas"]["burst"], 77,
        "the store kept its settings: {view}"
    );
}

/// A running store whose files cannot be archived on removal stays known — a failed store,
/// shown with why — and a later `DELETE` archives it once that works. Before, it was forgotten
/// first: its files stayed in `stores/<id>/`, where the next store of that id took them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_files_cannot_be_archived_is_not_forgotten() {
    let host = TestHost::start().await;
    host.deploy("writer", storehost_tests::programs::WRITER)
        .await;
    host.add_store("doomed", "writer", &[]).await;
    host.append("doomed", "kv.put", json!({"key": "k", "value": "kept"}))
        .await;
    host.settle("doomed").await;
    // The archive cannot be made: a file stands where its directory goes.
    let archive = host.data_dir.join("archive");
    let _ = std::fs::remove_dir(&archive);
    std::fs::write(&archive, b"in the way").unwrap();

    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/doomed", None)
        .await;
    assert!(status >= 500, "{status} {body}");
    let (status, body) = host.get("/v1/stores").await;
    assert_eq!(status, 200, "{body}");
    let failed = body["failed"].to_string();
    assert!(
        failed.contains("doomed") && failed.contains("could not be removed"),
        "still known, with why: {body}"
    );
    assert!(host.data_dir.join("stores/doomed/store.db").exists());
    // Its answer says that a restart finishes the removal (not that it starts the store).
    let (status, shown) = host.get("/v1/stores/doomed").await;
    assert_eq!(status, 503, "{shown}");
    let message = shown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not be removed") && message.contains("finishes the removal"),
        "{message}"
    );

    std::fs::remove_file(&archive).unwrap();
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/doomed", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!host.data_dir.join("stores/doomed").exists());
    let archived = std::fs::read_dir(&archive)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("doomed-"));
    assert!(archived, "its files are in the archive");
}

/// The workspace registry and webhooks only start stores that are new (`start_if_new`),
/// decided under the change lock. Each case failed before (found by an audit, with curl):
/// - a store the API started while a reconcile pass was adding others was changed back to
///   the defaults (its quotas and config lost) and counted as added;
/// - a config store whose start failed was taken over: started on the defaults as the
///   registry's (or a webhook's), after which a webhook or a pass could remove it;
/// - an API store that host.db keeps but that did not run (its start failed at a restart)
///   came back on the defaults as the registry's;
/// - a config store was removed by a removal checked before the config took it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_and_webhooks_start_only_new_stores_and_remove_no_config_store() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    let orchestrator = &host.orchestrator;
    let defaults = orchestrator.settings().defaults.clone();

    // A running API store is left as it is.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/api-own",
            Some(json!({"quotas": {"burst": 77}, "config": {"tier": "gold"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for source in [StoreSource::Registry, StoreSource::Webhook] {
        let answer = orchestrator.start_if_new(&id("api-own"), source).await;
        assert!(matches!(answer, Ok(Provisioned::Unchanged)), "{answer:?}");
    }
    let (_, view) = host.get("/v1/stores/api-own").await;
    assert_eq!(view["source"], "api", "{view}");
    assert_eq!(view["quotas"]["burst"], 77, "{view}");
    assert_eq!(view["config"]["tier"], "gold", "{view}");

    // A config store whose start failed stays the config's.
    let broken = host.data_dir.join("stores/cfg-failed");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(&broken, b"not a directory").unwrap();
    let failed = orchestrator
        .ensure_running(&id("cfg-failed"), defaults.clone(), StoreSource::Config)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    std::fs::remove_file(&broken).unwrap();
    for source in [StoreSource::Webhook, StoreSource::Registry] {
        let answer = orchestrator.start_if_new(&id("cfg-failed"), source).await;
        assert!(
            matches!(&answer, Err(ControlError::ConfigOwned(why)) if why.contains("its start failed")),
            "{answer:?}"
        );
    }
    let (_, owner) = orchestrator
        .failed_start(&id("cfg-failed"))
        .expect("still a failed store");
    assert_eq!(owner, Some(StoreSource::Config));
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/cfg-failed", None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "config_owned", "{body}");

    // A running config store is never removed by them, checked under the change lock.
    orchestrator
        .ensure_running(&id("cfg-running"), defaults.clone(), StoreSource::Config)
        .await
        .unwrap();
    let refused = orchestrator.remove_unowned(&id("cfg-running"), false).await;
    assert!(
        matches!(refused, Err(ControlError::ConfigOwned(_))),
        "{refused:?}"
    );
    let (status, _) = host.get("/v1/stores/cfg-running").await;
    assert_eq!(status, 200, "still running");

    // A store host.db keeps that does not run starts as its owner had it.
    let mut kept = defaults.clone();
    kept.quotas.burst = 9;
    kept.config.insert("tier".into(), "silver".into());
    orchestrator
        .registry()
        .put(&id("api-kept"), StoreSource::Api, &kept)
        .unwrap();
    let answer = orchestrator
        .start_if_new(&id("api-kept"), StoreSource::Registry)
        .await;
    assert!(matches!(answer, Ok(Provisioned::Created)), "{answer:?}");
    let (_, view) = host.get("/v1/stores/api-kept").await;
    assert_eq!(view["source"], "api", "{view}");
    assert_eq!(view["quotas"]["burst"], 9, "{view}");
    assert_eq!(view["config"]["tier"], "silver", "{view}");

    // A new store starts on the defaults, the caller's.
    let answer = orchestrator
        .start_if_new(&id("brand-new"), StoreSource::Webhook)
        .await;
    assert!(matches!(answer, Ok(Provisioned::Created)), "{answer:?}");
    let (_, view) = host.get("/v1/stores/brand-new").await;
    assert_eq!(view["source"], "webhook", "{view}");
}

/// Two ways a config store used to lose its owner, or keep one it no longer had:
/// - the config dropped a store whose files could not be archived: it stayed a failed store
///   "declared in the config file" (which no longer declared it, and would never try again),
///   so nothing could remove it; now the config releases it and the API's DELETE finishes;
/// - a config store whose start failed, kept in host.db from an earlier owner (the API), was
///   started again at the host's start as the API's; now the config keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_store_keeps_its_owner_until_the_config_lets_it_go() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    let orchestrator = &host.orchestrator;
    let defaults = orchestrator.settings().defaults.clone();

    orchestrator
        .ensure_running(&id("cfg-dropped"), defaults.clone(), StoreSource::Config)
        .await
        .unwrap();
    let archive = host.data_dir.join("archive");
    let _ = std::fs::remove_dir(&archive);
    std::fs::write(&archive, b"in the way").unwrap();
    let failed = orchestrator.remove(&id("cfg-dropped"), false).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(orchestrator.source(&id("cfg-dropped")).await, None);
    std::fs::remove_file(&archive).unwrap();
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/cfg-dropped", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!host.data_dir.join("stores/cfg-dropped").exists());

    let mut kept = defaults.clone();
    kept.quotas.burst = 9;
    orchestrator
        .registry()
        .put(&id("cfg-taken"), StoreSource::Api, &kept)
        .unwrap();
    let broken = host.data_dir.join("stores/cfg-taken");
    std::fs::write(&broken, b"not a directory").unwrap();
    let failed = orchestrator
        .ensure_running(&id("cfg-taken"), defaults.clone(), StoreSource::Config)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    std::fs::remove_file(&broken).unwrap();
    // Refused before it opened anything (a memory quota above the pool's ceiling): the same.
    orchestrator
        .registry()
        .put(&id("cfg-too-big"), StoreSource::Api, &kept)
        .unwrap();
    let mut too_big = defaults.clone();
    too_big.quotas.memory = u64::MAX / 2;
    let refused = orchestrator
        .ensure_running(&id("cfg-too-big"), too_big, StoreSource::Config)
        .await;
    assert!(
        matches!(refused, Err(ControlError::MemoryAboveCeiling { .. })),
        "{refused:?}"
    );
    orchestrator.restore_persisted().await.unwrap();
    for name in ["cfg-taken", "cfg-too-big"] {
        assert!(
            orchestrator.get(&id(name)).await.is_none(),
            "{name} not started as the API's"
        );
        assert_eq!(
            orchestrator.source(&id(name)).await,
            Some(StoreSource::Config),
            "{name}"
        );
    }

    // The owner outlives a long history: a webhook's store paused and resumed many times,
    // whose removal then fails, is still the webhook's.
    orchestrator
        .ensure_running(&id("busy-hook"), defaults.clone(), StoreSource::Webhook)
        .await
        .unwrap();
    for _ in 0..15 {
        orchestrator
            .set_paused(&id("busy-hook"), true)
            .await
            .unwrap();
        orchestrator
            .set_paused(&id("busy-hook"), false)
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(&archive).unwrap();
    std::fs::write(&archive, b"in the way").unwrap();
    let failed = orchestrator.remove_unowned(&id("busy-hook"), false).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        orchestrator.source(&id("busy-hook")).await,
        Some(StoreSource::Webhook)
    );
    std::fs::remove_file(&archive).unwrap();
}

/// A removal host.db could not finish (it refused to forget the store after its files were
/// archived; a host killed at that point is the same) is finished at the next start: the
/// store does not come back without its data. Before, its row brought it back empty. A store
/// started again after such a failure is not removed at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_host_db_could_not_finish_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = || host_on(&data);
    let first = start().await;
    for name in ["leaving", "returning"] {
        let (status, body) = first
            .call(reqwest::Method::PUT, &format!("/v1/stores/{name}"), None)
            .await;
        assert_eq!(status, 201, "{body}");
        first
            .append(name, "kv.put", json!({"key": "k", "value": name}))
            .await;
        first.settle(name).await;
    }
    // host.db refuses to forget them (as a full disk or a kill at that moment would).
    let host_db = rusqlite::Connection::open(data.join("host.db")).unwrap();
    host_db
        .execute_batch(
            "CREATE TRIGGER refuse_forgetting BEFORE DELETE ON stores
             BEGIN SELECT RAISE(ABORT, 'host.db refuses (test)'); END;",
        )
        .unwrap();
    for name in ["leaving", "returning"] {
        let (status, body) = first
            .call(reqwest::Method::DELETE, &format!("/v1/stores/{name}"), None)
            .await;
        assert!(status >= 500, "{status} {body}");
        assert!(
            !data.join("stores").join(name).exists(),
            "its files were archived"
        );
    }
    host_db
        .execute_batch("DROP TRIGGER refuse_forgetting")
        .unwrap();
    // One of them is started again (on fresh files): its removal is off.
    let (status, body) = first
        .call(reqwest::Method::PUT, "/v1/stores/returning", None)
        .await;
    assert_eq!(status, 201, "{body}");
    first.stop().await;

    let second = start().await;
    assert_eq!(second.orchestrator.restore_persisted().await.unwrap(), 1);
    let (status, body) = second.get("/v1/stores/leaving").await;
    assert_eq!(status, 404, "not back without its data: {body}");
    assert!(!data.join("stores/leaving").exists());
    let archived: Vec<_> = std::fs::read_dir(data.join("archive"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("leaving-"))
        .collect();
    assert_eq!(
        archived.len(),
        1,
        "its data is in the archive: {archived:?}"
    );
    let (status, body) = second.get("/v1/stores/returning").await;
    assert_eq!(status, 200, "{body}");
    second.stop().await;

    // Finished for good: host.db no longer knows it.
    let third = start().await;
    assert_eq!(third.orchestrator.restore_persisted().await.unwrap(), 1);
    assert_eq!(third.get("/v1/stores/leaving").await.0, 404);
}

/// A start cut short by a signal (the host told to stop before its stores started) finishes
/// no removal host.db records as under way: the config may declare such a store again, and
/// the stores it declares had not started, so the store's files would be archived from under
/// it. The files stay, and the next whole start finishes the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_short_finishes_no_removal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = host_on(&data).await;
    let (status, body) = first
        .call(reqwest::Method::PUT, "/v1/stores/kept", None)
        .await;
    assert_eq!(status, 201, "{body}");
    first
        .append("kept", "kv.put", json!({"key": "k", "value": 1}))
        .await;
    first.settle("kept").await;
    first.stop().await;
    // A removal begun, and the host killed before it archived anything.
    let kept = StoreId::new("kept").unwrap();
    storehost_control::registry::Registry::open(&data.join("host.db"))
        .unwrap()
        .begin_removal(&kept, false)
        .unwrap();

    let second = host_on(&data).await;
    second.orchestrator.stop_starting();
    second.orchestrator.restore_persisted().await.unwrap();
    assert!(
        data.join("stores/kept/store.db").exists(),
        "a start cut short archived the store's files"
    );
    assert_eq!(archived(&data, "kept"), 0);
    second.stop().await;

    let third = host_on(&data).await;
    assert_eq!(third.orchestrator.restore_persisted().await.unwrap(), 0);
    assert!(
        !data.join("stores/kept").exists(),
        "the next start finished it"
    );
    assert_eq!(third.get("/v1/stores/kept").await.0, 404);
    assert_eq!(archived(&data, "kept"), 1, "its data is in the archive");
}

/// A store the config file (or `STORE_IDS`) started, dropped from it while the host was down,
/// is removed at the next start as a live edit would have removed it: its data archived, its
/// pause and tokens gone, so a store created later under its id starts empty, running, and
/// unreachable with the old tokens. Before, its directory stayed in place for no one, and the
/// next store of that id (a webhook's, say) took over its events, its pause and its tokens. A
/// store the config still declares keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_store_dropped_while_the_host_was_down_is_archived_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = host_on(&data).await;
    let defaults = first.orchestrator.defaults();
    start_with_an_event(
        &first,
        &[("dropped", StoreSource::Config), ("kept", StoreSource::Env)],
    )
    .await;
    let (old_token, _) = first.issue_token("dropped").await;
    first
        .orchestrator
        .set_paused(&id("dropped"), true)
        .await
        .unwrap();
    first.stop().await;

    // Only `kept` is declared now.
    let second = host_on(&data).await;
    second
        .orchestrator
        .ensure_running(&id("kept"), defaults.clone(), StoreSource::Env)
        .await
        .unwrap();
    second.orchestrator.restore_persisted().await.unwrap();
    assert!(
        !data.join("stores/dropped").exists(),
        "its files were left in place"
    );
    assert_eq!(archived(&data, "dropped"), 1, "its data is in the archive");
    assert_eq!(archived(&data, "kept"), 0);
    let (_, body) = second.get("/v1/stores/kept").await;
    assert_eq!(body["head"], 1, "the declared store keeps its data: {body}");

    let (status, body) = second
        .call(reqwest::Method::PUT, "/v1/stores/dropped", None)
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, body) = second.get("/v1/stores/dropped").await;
    assert_eq!(
        body["head"], 0,
        "a new store under its id starts empty: {body}"
    );
    assert_eq!(body["state"], "running", "{body}");
    let status = reqwest::Client::new()
        .get(format!("{}/v1/stores/dropped/events?after=0", second.url))
        .bearer_auth(&old_token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "the old store's token opens the new one");
}

/// A host started without most of the stores its config ran (more than half of them gone at
/// once: `STORE_IDS` left out, another `--config`) archives none of them and revokes no
/// token: they show as failed stores saying why, a `DELETE` archives one, and a start with
/// the config that declares them runs them with their data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_stores_gone_all_at_once_are_held_back_not_archived() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = host_on(&data).await;
    let defaults = first.orchestrator.defaults();
    let names = ["env-a", "env-b", "env-c"];
    start_with_an_event(&first, &names.map(|name| (name, StoreSource::Env))).await;
    first.stop().await;

    // Started without STORE_IDS.
    let second = host_on(&data).await;
    second.orchestrator.restore_persisted().await.unwrap();
    for name in names {
        assert!(
            data.join("stores").join(name).exists(),
            "{name} was archived"
        );
        let (_, body) = second.get(&format!("/v1/stores/{name}")).await;
        assert_eq!(body["error"]["code"], "store_failed", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("3 of the 3 stores")),
            "{name} does not say why: {body}"
        );
    }
    let (status, body) = second
        .call(reqwest::Method::DELETE, "/v1/stores/env-c", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(archived(&data, "env-c"), 1);
    second.stop().await;

    let third = host_on(&data).await;
    for name in ["env-a", "env-b"] {
        third
            .orchestrator
            .ensure_running(&id(name), defaults.clone(), StoreSource::Env)
            .await
            .unwrap();
        let (_, body) = third.get(&format!("/v1/stores/{name}")).await;
        assert_eq!(body["head"], 1, "{name} kept its data: {body}");
    }
    third.orchestrator.restore_persisted().await.unwrap();
    assert_eq!(archived(&data, "env-a") + archived(&data, "env-b"), 0);
}

/// A config store this host ran, placed on another host since, is that host's: the next start
/// here does not archive it as undeclared (its files stay for the host that runs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_store_placed_elsewhere_since_is_not_archived_as_undeclared() {
    use storehost_tests::{TestHostOptions, programs};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = host_on(&data).await;
    start_with_an_event(
        &first,
        &[
            ("elsewhere-1", StoreSource::Config),
            ("here-1", StoreSource::Config),
        ],
    )
    .await;
    first.stop().await;

    let second = TestHost::start_configured(
        TestHostOptions {
            data_dir: Some(data.clone()),
            seams: Seams {
                placement: Arc::new(TwoElsewhere),
                ..Seams::default()
            },
            ..TestHostOptions::default()
        },
        &[("writer", programs::WRITER)],
        |_, state| state,
    )
    .await;
    second
        .orchestrator
        .ensure_running(
            &id("here-1"),
            second.orchestrator.defaults(),
            StoreSource::Config,
        )
        .await
        .unwrap();
    second.orchestrator.restore_persisted().await.unwrap();
    assert!(
        data.join("stores/elsewhere-1/store.db").exists(),
        "another host's store was archived"
    );
    assert_eq!(archived(&data, "elsewhere-1"), 0);
}

/// Starts each of `stores` on `host` as declared by its source, on the defaults, with one
/// event applied.
async fn start_with_an_event(host: &TestHost, stores: &[(&str, StoreSource)]) {
    for &(name, source) in stores {
        host.orchestrator
            .ensure_running(&id(name), host.orchestrator.defaults(), source)
            .await
            .unwrap();
        host.append(name, "kv.put", json!({"key": "k", "value": name}))
            .await;
        host.settle(name).await;
    }
}

/// How many archives of store `id` `DATA_DIR/archive` holds.
fn archived(data: &std::path::Path, id: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(data.join("archive")) else {
        return 0;
    };
    entries
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with(&format!("{id}-")))
        .count()
}

/// Places `elsewhere-1` on host `host-b` and `elsewhere-2` on a host it does not name; every
/// other store runs here.
#[derive(Debug)]
struct TwoElsewhere;

impl Placement for TwoElsewhere {
    fn place(&self, id: &StoreId) -> Placed {
        match id.as_str() {
            "elsewhere-1" => Placed::Elsewhere {
                host: Some("host-b".into()),
            },
            "elsewhere-2" => Placed::Elsewhere { host: None },
            _ => Placed::Here,
        }
    }
}

/// The seam to several hosts (SPEC §10): a store the placement runs on another host is
/// started by no source — API, config, webhook, reconciler, a restore at start-up — each told
/// why, while the others start; its desired state is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_placed_on_another_host_is_started_by_no_source() {
    use storehost_tests::control::with_webhooks;
    use storehost_tests::{TestHostOptions, programs};
    let host = TestHost::start_configured(
        TestHostOptions {
            seams: Seams {
                placement: Arc::new(TwoElsewhere),
                ..Seams::default()
            },
            ..TestHostOptions::default()
        },
        &[("writer", programs::WRITER)],
        |orchestrator, state| with_webhooks(orchestrator, state, "placement-secret", 10_000),
    )
    .await;
    let orchestrator = &host.orchestrator;
    let defaults = orchestrator.settings().defaults.clone();

    // The API: 421, naming the store and where it runs.
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/elsewhere-1", None)
        .await;
    assert_eq!(status, 421, "{body}");
    assert_eq!(body["error"]["code"], "placed_elsewhere", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("store elsewhere-1 is placed on host \"host-b\""),
        "{message}"
    );
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/elsewhere-2", None)
        .await;
    assert_eq!(status, 421, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("store elsewhere-2 is placed on another host"),
        "{body}"
    );
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/here-1", None)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(host.get("/v1/stores/elsewhere-1").await.0, 404);

    // The config (a start, or an edit): refused, and no failed store of this host's.
    let answers = orchestrator
        .ensure_running_many(vec![
            (id("elsewhere-1"), defaults.clone(), StoreSource::Config),
            (id("here-2"), defaults.clone(), StoreSource::Config),
        ])
        .await;
    assert!(
        matches!(&answers[0].1, Err(ControlError::PlacedElsewhere { id: placed, host: Some(on) })
            if placed.as_str() == "elsewhere-1" && on == "host-b"),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1].1, Ok(Provisioned::Created)),
        "{answers:?}"
    );
    assert!(orchestrator.failed_start(&id("elsewhere-1")).is_none());
    assert_eq!(host.get("/v1/stores").await.1["failed"], json!([]));

    // A webhook: 421 (not kept for replays); the reconciler: refused too.
    let webhook = |instance: &str| {
        host.client
            .post(format!("{}/webhooks/workspaces", host.url))
            .header("x-webhook-secret", "placement-secret")
            .json(&json!({"event": "workspace.created", "instanceId": instance}))
            .send()
    };
    let answer = webhook("elsewhere-1").await.unwrap();
    assert_eq!(answer.status(), 421);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "placed_elsewhere", "{body}");
    let answer = webhook("here-3").await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer = orchestrator
        .start_if_new(&id("elsewhere-1"), StoreSource::Registry)
        .await;
    assert!(
        matches!(answer, Err(ControlError::PlacedElsewhere { .. })),
        "{answer:?}"
    );

    // A restore at start-up starts what is placed here and leaves the rest kept.
    orchestrator
        .registry()
        .put(&id("elsewhere-1"), StoreSource::Api, &defaults)
        .unwrap();
    orchestrator
        .registry()
        .put(&id("here-4"), StoreSource::Api, &defaults)
        .unwrap();
    // here-1 and here-3 (running), here-4 (started); not elsewhere-1.
    assert_eq!(orchestrator.restore_persisted().await.unwrap(), 3);
    assert!(orchestrator.get(&id("elsewhere-1")).await.is_none());
    assert!(
        orchestrator
            .registry()
            .get(&id("elsewhere-1"))
            .unwrap()
            .is_some(),
        "its desired state is kept"
    );
    let running: Vec<String> = orchestrator
        .ids()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(running, ["here-1", "here-2", "here-3", "here-4"]);
}

/// Desired state kept in memory, as another backend (etcd) would keep it off this host.
#[derive(Debug, Default)]
struct MemoryDesiredState {
    specs: Mutex<BTreeMap<StoreId, (StoreSource, StoreSpec)>>,
    paused: Mutex<BTreeSet<StoreId>>,
    removals: Mutex<BTreeMap<StoreId, bool>>,
    config_stores: Mutex<BTreeSet<StoreId>>,
}

impl DesiredState for MemoryDesiredState {
    fn all(&self) -> Result<Vec<(StoreId, StoreSource, StoreSpec)>, ControlError> {
        let specs = self.specs.lock().unwrap();
        Ok(specs
            .iter()
            .map(|(id, (source, spec))| (id.clone(), *source, spec.clone()))
            .collect())
    }

    fn get(&self, id: &StoreId) -> Result<Option<(StoreSource, StoreSpec)>, ControlError> {
        Ok(self.specs.lock().unwrap().get(id).cloned())
    }

    fn put(&self, id: &StoreId, source: StoreSource, spec: &StoreSpec) -> Result<(), ControlError> {
        let kept = (source, spec.clone());
        self.specs.lock().unwrap().insert(id.clone(), kept);
        Ok(())
    }

    fn forget_spec(&self, id: &StoreId) -> Result<(), ControlError> {
        self.specs.lock().unwrap().remove(id);
        Ok(())
    }

    fn delete(&self, id: &StoreId) -> Result<(), ControlError> {
        self.specs.lock().unwrap().remove(id);
        self.paused.lock().unwrap().remove(id);
        self.removals.lock().unwrap().remove(id);
        self.config_stores.lock().unwrap().remove(id);
        Ok(())
    }

    fn set_paused(&self, id: &StoreId, paused: bool) -> Result<(), ControlError> {
        let mut kept = self.paused.lock().unwrap();
        if paused {
            kept.insert(id.clone());
        } else {
            kept.remove(id);
        }
        Ok(())
    }

    fn is_paused(&self, id: &StoreId) -> Result<bool, ControlError> {
        Ok(self.paused.lock().unwrap().contains(id))
    }

    fn begin_removal(&self, id: &StoreId, purge: bool) -> Result<(), ControlError> {
        self.removals.lock().unwrap().insert(id.clone(), purge);
        Ok(())
    }

    fn cancel_removal(&self, id: &StoreId) -> Result<(), ControlError> {
        self.removals.lock().unwrap().remove(id);
        Ok(())
    }

    fn removals(&self) -> Result<Vec<(StoreId, bool)>, ControlError> {
        let removals = self.removals.lock().unwrap();
        Ok(removals
            .iter()
            .map(|(id, purge)| (id.clone(), *purge))
            .collect())
    }

    fn started_by_config(&self, id: &StoreId) -> Result<(), ControlError> {
        self.config_stores.lock().unwrap().insert(id.clone());
        Ok(())
    }

    fn config_stores(&self) -> Result<Vec<StoreId>, ControlError> {
        Ok(self.config_stores.lock().unwrap().iter().cloned().collect())
    }
}

/// The other half of the seam: an orchestrator built with another desired state keeps
/// stores' specs and pauses there, not in `host.db`, and a host on another data directory
/// restores them from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_kept_off_the_host_brings_the_stores_back_on_another() {
    use storehost_tests::{TestHostOptions, programs};
    let desired = Arc::new(MemoryDesiredState::default());
    let start = || {
        TestHost::start_configured(
            TestHostOptions {
                seams: Seams {
                    desired_state: Some(desired.clone()),
                    ..Seams::default()
                },
                ..TestHostOptions::default()
            },
            &[("writer", programs::WRITER)],
            |_, state| state,
        )
    };
    let first = start().await;
    let (status, body) = first
        .call(
            reqwest::Method::PUT,
            "/v1/stores/kept-off",
            Some(json!({"config": {"tier": "gold"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = first
        .call(reqwest::Method::POST, "/v1/stores/kept-off/pause", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(desired.get(&id("kept-off")).unwrap().is_some());
    assert!(desired.is_paused(&id("kept-off")).unwrap());
    assert!(
        first.orchestrator.registry().all().unwrap().is_empty(),
        "host.db keeps no spec"
    );
    first.stop().await;

    // Another host (its own data directory) on the same desired state.
    let second = start().await;
    assert_eq!(second.orchestrator.restore_persisted().await.unwrap(), 1);
    let (status, view) = second.get("/v1/stores/kept-off").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["source"], "api", "{view}");
    assert_eq!(view["config"]["tier"], "gold", "{view}");
    assert_eq!(view["state"], "paused", "{view}");
    let (status, body) = second
        .call(reqwest::Method::DELETE, "/v1/stores/kept-off", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(desired.all().unwrap().is_empty());
    assert!(!desired.is_paused(&id("kept-off")).unwrap());
}
