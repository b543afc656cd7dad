//! Operations assets proven against the real thing: the node's scrape passes `promtool check metrics`,
//! every Grafana panel query runs on a real Prometheus scraping a real node and returns data, every
//! metric the dashboards and alerts name is exported, and the alert rules pass their promtool tests.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every panel query of every dashboard, as (dashboard, panel title, expr).
fn dashboard_queries() -> Vec<(String, String, String)> {
    fn walk(panels: &[Value], dashboard: &str, out: &mut Vec<(String, String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((dashboard.to_owned(), title.clone(), expr.to_owned()));
                }
            }
            walk(
                panel["panels"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                dashboard,
                out,
            );
        }
    }
    let mut queries = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("grafana/dashboards"))
        .expect("grafana/dashboards")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "an overview and a nodes dashboard");
    for file in files {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let name = dashboard["title"].as_str().unwrap().to_owned();
        walk(dashboard["panels"].as_array().unwrap(), &name, &mut queries);
    }
    queries
}

/// A dashboard query with Grafana's variables filled in as Grafana would.
fn fill_variables(expr: &str) -> String {
    expr.replace("${node:regex}", ".*")
        .replace("${node}", ".*")
        .replace("$node", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

/// `orderly_*` metric names an expression uses, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("orderly_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo("prometheus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// A Prometheus that scrapes `targets` as the job `orderly` and evaluates the shipped alert
    /// rules, both every second.
    async fn start(targets: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: orderly\n    static_configs:\n      - targets: {targets:?}\n",
            rules = repo("prometheus/alerts.yml").display(),
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (apt-get install prometheus)");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        wait_until(
            "Prometheus to be ready",
            Duration::from_secs(30),
            || async { (reqwest::get(&ready).await.ok()?.status() == 200).then_some(()) },
        )
        .await;
        prometheus
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("JSON")
    }

    /// How many times each rule group has been evaluated, from Prometheus' own metrics.
    async fn group_evaluations(&self) -> Vec<(String, f64)> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("Prometheus answers")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter_map(|line| line.strip_prefix("prometheus_rule_group_iterations_total{"))
            .filter_map(|rest| {
                let (labels, value) = rest.split_once("} ")?;
                Some((labels.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    async fn query(&self, expr: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("JSON")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_returns_data_from_a_live_node() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "20ms")
        .env("ORDERLY_FAILURE_RATE", "0.1")
        .start()
        .await;
    let prometheus = Prometheus::start(&[node.http.trim_start_matches("http://")]).await;

    // Orders through every interface, some failing, a bad submission and a poison message.
    let http = reqwest::Client::new();
    let client = server.client().await;
    for i in 0..60 {
        submit(&http, &node, json!({ "n": i })).await;
        client
            .request("orders.create", json!({ "n": i }).to_string().into())
            .await
            .unwrap();
    }
    let js = async_nats::jetstream::new(client.clone());
    for _ in 0..20 {
        let id = Uuid::now_v7();
        publish_order(&js, id).await;
    }
    js.publish("orders.submit.not-an-id", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    http.post(format!("{}/orders", node.http))
        .body("nope")
        .send()
        .await
        .unwrap();
    http.get(format!("{}/orders/{}", node.http, Uuid::now_v7()))
        .send()
        .await
        .unwrap();

    wait_until("140 finished orders", Duration::from_secs(60), || async {
        (metric_sum(&node.metrics().await, "orderly_orders_finished_total") >= 140.0).then_some(())
    })
    .await;

    // The live scrape is clean.
    let scrape = node.metrics().await;
    let (ok, problems) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(
        ok && problems.trim().is_empty(),
        "promtool check metrics: {problems}"
    );

    // Every metric the dashboards and alerts use is exported.
    let mut used = BTreeSet::new();
    for (_, _, expr) in dashboard_queries() {
        used.extend(metric_names(&expr));
    }
    used.extend(metric_names(
        &std::fs::read_to_string(repo("prometheus/alerts.yml")).unwrap(),
    ));
    assert!(
        used.len() >= 15,
        "dashboards and alerts use the node's metrics: {used:?}"
    );
    for name in &used {
        assert!(
            scrape
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name.as_str())),
            "{name} is used by a dashboard or alert but the node does not export it"
        );
    }

    // Wait until Prometheus holds a few minutes' worth of rate windows: enough scrapes for rate().
    wait_until(
        "Prometheus to have scraped the node",
        Duration::from_secs(60),
        || async {
            let result = prometheus
                .query("count_over_time(orderly_orders_finished_total[1m]) >= 5")
                .await;
            (!result["data"]["result"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;

    let queries = dashboard_queries();
    assert!(
        queries.len() >= 15,
        "the dashboards have panels: {}",
        queries.len()
    );
    let mut failures = Vec::new();
    for (dashboard, panel, expr) in &queries {
        let filled = fill_variables(expr);
        let answer = prometheus.query(&filled).await;
        if answer["status"] != "success" {
            failures.push(format!(
                "{dashboard} / {panel}: {filled}: {}",
                answer["error"]
            ));
        } else if answer["data"]["result"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            failures.push(format!("{dashboard} / {panel}: {filled}: no data"));
        }
    }
    assert!(
        failures.is_empty(),
        "panel queries failing:\n{}",
        failures.join("\n")
    );

    // The alert rules loaded into Prometheus and evaluate without error.
    let rules: Value = reqwest::get(format!("{}/api/v1/rules", prometheus.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let loaded: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert!(loaded.len() >= 10, "alert rules loaded: {}", loaded.len());
    for rule in loaded {
        assert_eq!(
            rule["health"], "ok",
            "rule {} evaluates: {}",
            rule["name"], rule["lastError"]
        );
    }
}

/// A newcomer's first minutes: two healthy nodes that have taken a few orders, and a Prometheus that
/// has just started with the shipped alert rules. Once it has scraped both nodes and evaluated every
/// rule group on that data, no alert is pending or firing, over many evaluations of every group.
#[tokio::test(flavor = "multi_thread")]
async fn healthy_nodes_and_a_fresh_prometheus_raise_no_alert() {
    const EVALUATIONS: f64 = 15.0;
    let server = NatsServer::start().await;
    let a = Node::builder(&server.url).id("a").start().await;
    let b = Node::builder(&server.url).id("b").start().await;
    let targets = [
        a.http.trim_start_matches("http://"),
        b.http.trim_start_matches("http://"),
    ];

    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (i, node) in [&a, &b, &a, &b, &a, &b].into_iter().enumerate() {
        ids.push(submit(&http, node, json!({ "n": i })).await);
    }
    let prometheus = Prometheus::start(&targets).await;
    let kv = server.js().await.get_key_value("orders").await.unwrap();
    wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;

    // From the first scrape of both nodes on, every evaluation of every group finds nothing.
    wait_until(
        "Prometheus to scrape both nodes",
        Duration::from_secs(20),
        || async {
            let up = prometheus.query(r#"up{job="orderly"} == 1"#).await;
            (up["data"]["result"].as_array()?.len() == 2).then_some(())
        },
    )
    .await;
    // An evaluation that ran before the first scrape may have seen no node (OrderlyNoNodes pending
    // for one evaluation): watch from the second evaluation after both nodes were scraped.
    let scraped = prometheus.group_evaluations().await;
    let start = wait_until(
        "every rule group to be evaluated on the scraped data",
        Duration::from_secs(20),
        || async {
            let now = prometheus.group_evaluations().await;
            let before = |group: &str| {
                scraped
                    .iter()
                    .find(|(g, _)| g == group)
                    .map_or(0.0, |(_, n)| *n)
            };
            now.iter()
                .all(|(group, n)| n - before(group) >= 2.0)
                .then_some(now)
        },
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut seen = Vec::new();
    loop {
        let alerts = prometheus.get("/api/v1/alerts").await;
        for alert in alerts["data"]["alerts"].as_array().into_iter().flatten() {
            seen.push(format!(
                "{} {}: {}",
                alert["state"], alert["labels"], alert["annotations"]["description"]
            ));
        }
        let now = prometheus.group_evaluations().await;
        let groups: Vec<_> = now
            .iter()
            .filter(|(group, _)| group.contains("alerts.yml;orderly-"))
            .collect();
        let evaluated = groups.len() == 3
            && groups.iter().all(|(group, n)| {
                let before = start
                    .iter()
                    .find(|(g, _)| g == group)
                    .map_or(0.0, |(_, n)| *n);
                n - before >= EVALUATIONS
            });
        if evaluated {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every rule group evaluated {EVALUATIONS} times within 40 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen.is_empty(),
        "alerts pending or firing with healthy nodes:\n{}",
        seen.join("\n")
    );

    // The rules evaluated without error, and the last evaluation also found nothing.
    let rules = prometheus.get("/api/v1/rules").await;
    for rule in rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        assert_eq!(
            rule["health"], "ok",
            "rule {}: {}",
            rule["name"], rule["lastError"]
        );
        assert_eq!(
            rule["state"], "inactive",
            "rule {}: {}",
            rule["name"], rule["alerts"]
        );
    }
    let alerts = prometheus.get("/api/v1/alerts").await;
    assert_eq!(
        alerts["data"]["alerts"],
        json!([]),
        "alerts with healthy nodes"
    );
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let (ok, output) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "promtool check rules: {output}");
    let (ok, output) = promtool(&["check", "config", "prometheus.yml"], None);
    assert!(ok, "promtool check config: {output}");
    // The shipped configuration scrapes what the README starts, one node with HTTP on
    // 127.0.0.1:8080, and nothing else: a target nobody listens on raises OrderlyNodeDown.
    let config = std::fs::read_to_string(repo("prometheus/prometheus.yml")).unwrap();
    let targets: Vec<&str> = config
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "- targets:")
        .skip(1)
        .map_while(|l| l.strip_prefix("- "))
        .collect();
    assert_eq!(targets, ["127.0.0.1:8080"], "targets in prometheus.yml");
    let (ok, output) = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert!(ok, "promtool test rules: {output}");
}

#[test]
fn every_alert_has_a_runbook_entry_and_a_firing_and_a_quiet_test() {
    let alerts = std::fs::read_to_string(repo("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo("prometheus/alerts.test.yml")).unwrap();
    let runbook = std::fs::read_to_string(repo("prometheus/RUNBOOK.md"))
        .unwrap()
        .to_lowercase();
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- alert:")
                .or_else(|| l.trim().strip_prefix("alert:"))
        })
        .map(str::trim)
        .collect();
    assert!(names.len() >= 10, "alerts: {names:?}");
    // Runbook links are absolute, so Alertmanager and every receiver can open them: the base is the
    // RUNBOOK.md of the repository named in Cargo.toml, and the anchor is the alert's heading.
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let repository = manifest
        .lines()
        .find_map(|l| l.strip_prefix("repository = "))
        .expect("Cargo.toml names the repository")
        .trim_matches('"');
    let base = format!("{repository}/blob/main/prometheus/RUNBOOK.md");
    assert!(base.starts_with("https://"), "runbook base {base}");
    let urls: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url:"))
        .map(|url| url.trim().trim_matches('"'))
        .collect();
    assert_eq!(urls.len(), names.len(), "one runbook_url per alert");
    for (name, url) in names.iter().zip(&urls) {
        assert_eq!(
            *url,
            format!("{base}#{}", name.to_lowercase()),
            "runbook_url of {name}"
        );
    }
    for name in names {
        assert!(
            runbook.contains(&format!("\n## {}\n", name.to_lowercase())),
            "RUNBOOK.md has no section headed {name}"
        );
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {name}")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{name} has no test where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| !c.contains("exp_alerts: []")),
            "{name} has no test where it fires"
        );
    }
}
