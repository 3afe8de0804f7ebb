//! How `storehost ctl` shows things to people: aligned tables, times, sizes.

use std::io::Write;

use serde_json::Value;

/// `println!` for `ctl`: through [`line`], so a reader gone (`| head`) ends the command
/// quietly and what a tenant wrote cannot drive the terminal.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::ctl::output::line(&format!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes `text` and a newline to stdout, every control character in it but newlines and tabs
/// written as its `\uXXXX` escape: what a tenant put in an event type or payload (an escape
/// sequence clearing the screen, retitling the window, writing the clipboard) is shown, not
/// obeyed. The escape is JSON's own, so `--json` output means the same (control characters
/// appear only inside its strings, and serde leaves DEL and the C1 range raw). A reader gone
/// (`| head`, a closed ssh session) ends the command quietly, as it ends `cat`: before,
/// `events tail` went on following the stream for nobody and the other commands panicked.
pub(crate) fn line(text: &str) {
    let mut shown = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            shown.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown.push('\n');
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout
        .write_all(shown.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {err}");
        std::process::exit(2);
    }
}

/// Prints `rows` under `headers`, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `pairs` as `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in pairs {
        outln!("{:<width$} {value}", format!("{key}:"));
    }
}

/// A JSON value as a table cell: strings without quotes (a newline in one as `\\n`, keeping
/// the row one line), `-` for null.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.replace('\n', "\\n"),
        other => other.to_string(),
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC` (`-` for null).
pub fn time(value: &Value) -> String {
    let Some(ms) = value.as_i64() else {
        return "-".to_owned();
    };
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The calendar date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A byte count for people: `512 B`, `3.2 MiB`.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Prints `value` as pretty JSON.
pub fn json(value: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_keeps_its_row_on_one_line() {
        assert_eq!(cell(&Value::from("two\nlines")), "two\\nlines");
        assert_eq!(cell(&Value::Null), "-");
    }

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(time(&Value::from(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            time(&Value::from(1_709_210_096_000_i64)),
            "2024-02-29 12:34:56 UTC"
        );
        assert_eq!(time(&Value::Null), "-");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
