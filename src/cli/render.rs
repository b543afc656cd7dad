//! What the terminal client prints: the API's JSON as it is with `--json`, else short text and tables
//! for people.

use super::client::Answer;
use super::Error;
use serde_json::Value;
use std::io::Write;

pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output { json }
    }

    /// A submitted order: its id alone, so that `id=$(orderly submit ...)` works.
    pub fn submitted(&self, accepted: &Answer) -> Result<(), Error> {
        if self.json {
            return println_out(accepted.raw.trim_end().to_owned());
        }
        println_out(text(&accepted.value["order_id"]))
    }

    /// An order's document (get, cancel, retry).
    pub fn document(&self, doc: &Answer) -> Result<(), Error> {
        if self.json {
            return println_out(doc.raw.trim_end().to_owned());
        }
        let doc = &doc.value;
        let mut out = String::new();
        let mut field = |name: &str, value: String| {
            out.push_str(&format!("{name:<15}{value}\n"));
        };
        field("order_id", text(&doc["order_id"]));
        field("state", text(&doc["state"]));
        field("current_step", text(&doc["current_step"]));
        field("start_time", text(&doc["start_time"]));
        field("complete_time", text(&doc["complete_time"]));
        if let Some(step) = doc["failed_step"].as_str() {
            field("failed_step", step.to_owned());
            field("failure_reason", text(&doc["failure_reason"]));
        }
        if let Some(intent) = doc.get("intent").filter(|i| i.is_object()) {
            let reason = intent["reason"].as_str().unwrap_or("-");
            field(
                "cancel",
                format!("requested {} ({reason})", text(&intent["requested_at"])),
            );
        }
        if let Some(retries) = doc["retries"].as_u64().filter(|&r| r > 0) {
            field("retries", retries.to_string());
        }
        if let Some(owner) = doc["owner"]["node"].as_str() {
            field("owner", owner.to_owned());
        }
        let steps = doc["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if !steps.is_empty() {
            let rows: Vec<Vec<String>> = steps
                .iter()
                .map(|s| {
                    vec![
                        text(&s["step_name"]),
                        text(&s["status"]),
                        text(&s["step_start_time"]),
                        text(&s["step_complete_time"]),
                        text(&s["rollback_complete_time"]),
                        text(&s["node"]),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table(
                &[
                    "STEP",
                    "STATUS",
                    "STARTED",
                    "COMPLETED",
                    "ROLLED BACK",
                    "NODE",
                ],
                &rows,
            ));
        }
        print_out(&out)
    }

    /// A page of a listing; the cursor of the next page goes to stderr unless every page is printed.
    pub fn page(&self, page: &Answer, all: bool) -> Result<(), Error> {
        if self.json {
            return println_out(page.raw.trim_end().to_owned());
        }
        let page = &page.value;
        let orders = page["orders"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let rows: Vec<Vec<String>> = orders
            .iter()
            .map(|o| {
                vec![
                    text(&o["order_id"]),
                    text(&o["state"]),
                    text(&o["current_step"]),
                    text(&o["start_time"]),
                    text(&o["complete_time"]),
                ]
            })
            .collect();
        if !rows.is_empty() {
            print_out(&table(
                &["ORDER_ID", "STATE", "STEP", "STARTED", "COMPLETED"],
                &rows,
            ))?;
        }
        if let (Some(next), false) = (page["next_cursor"].as_str(), all) {
            eprintln!("more: --cursor {next}");
        }
        Ok(())
    }

    /// One event of a watch.
    pub fn event(&self, event: &Value, raw: &str) -> Result<(), Error> {
        if self.json {
            return println_out(raw.to_owned());
        }
        println_out(format!(
            "{}  {:<17} {:<11} {:<16} {}",
            text(&event["time"]),
            text(&event["change"]),
            text(&event["to"]),
            text(&event["step"]),
            text(&event["node"]),
        ))
    }
}

/// A value as a cell: strings bare, null and absent as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        line.push('\n');
        line
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn print_out(text: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn println_out(line: String) -> Result<(), Error> {
    print_out(&(line + "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_every_column_but_the_last() {
        let rows = vec![vec!["a".to_owned(), "long cell".to_owned(), "x".to_owned()]];
        assert_eq!(
            table(&["H1", "H2", "H3"], &rows),
            "H1  H2         H3\na   long cell  x\n"
        );
        assert_eq!(text(&Value::Null), "-");
    }
}
