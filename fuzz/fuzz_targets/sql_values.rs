//! Guest SQL values through a real SQLite database (`store.db` opened as the host opens it):
//! any list of values bound as parameters comes back as the same values — from `SELECT ?1, …`
//! and from a table written with `guest_execute` and read with `guest_query`. SQLite turns a
//! NaN into NULL; that is the one documented change.
//!
//! Input: a sequence of `tag, data` items (tag % 5: null, integer (8 bytes), real (8 bytes),
//! text (length byte + bytes, lossy UTF-8), blob (length byte + bytes)).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use storehost_runtime::Value;
use storehost_store::Durability;
use storehost_store::guest_db::GuestDb;

thread_local! {
    static DB: RefCell<Option<(tempfile::TempDir, GuestDb)>> = const { RefCell::new(None) };
}

fn decode(mut data: &[u8]) -> Vec<Value> {
    let mut values = Vec::new();
    while let Some((&tag, rest)) = data.split_first() {
        data = rest;
        let value = match tag % 5 {
            0 => Value::Null,
            1 | 2 => {
                let mut bytes = [0u8; 8];
                let n = data.len().min(8);
                bytes[..n].copy_from_slice(&data[..n]);
                data = &data[n..];
                if tag % 5 == 1 {
                    Value::Integer(i64::from_le_bytes(bytes))
                } else {
                    Value::Real(f64::from_bits(u64::from_le_bytes(bytes)))
                }
            }
            _ => {
                let len = data.first().map_or(0, |l| usize::from(*l));
                data = data.get(1..).unwrap_or_default();
                let n = data.len().min(len);
                let bytes = &data[..n];
                data = &data[n..];
                if tag % 5 == 3 {
                    Value::Text(String::from_utf8_lossy(bytes).into_owned())
                } else {
                    Value::Blob(bytes.to_vec())
                }
            }
        };
        values.push(value);
        if values.len() == 64 {
            break;
        }
    }
    values
}

fn clone(value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::Integer(i) => Value::Integer(*i),
        Value::Real(f) => Value::Real(*f),
        Value::Text(s) => Value::Text(s.clone()),
        Value::Blob(b) => Value::Blob(b.clone()),
    }
}

/// What SQLite gives back for a bound value.
fn same(sent: &Value, got: &Value) -> bool {
    match (sent, got) {
        (Value::Null, Value::Null) => true,
        (Value::Real(f), Value::Null) => f.is_nan(),
        (Value::Integer(a), Value::Integer(b)) => a == b,
        (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits() || (a == b),
        (Value::Text(a), Value::Text(b)) => a == b,
        (Value::Blob(a), Value::Blob(b)) => a == b,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let values = decode(data);
    if values.is_empty() {
        return;
    }
    DB.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (_, db) = slot.get_or_insert_with(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let db = GuestDb::open(&dir.path().join("store.db"), Durability::Process, 1 << 30)
                .expect("store.db opens");
            db.guest_execute(
                "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v)",
                Vec::new(),
            )
            .expect("the table is created");
            (dir, db)
        });

        // Straight back from SELECT ?1, ?2, ...
        let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
        let rows = db
            .guest_query(
                &format!("SELECT {}", placeholders.join(", ")),
                values.iter().map(clone).collect(),
            )
            .expect("a SELECT of parameters runs");
        assert_eq!(rows.rows.len(), 1);
        assert_eq!(rows.rows[0].len(), values.len());
        for (sent, got) in values.iter().zip(&rows.rows[0]) {
            assert!(same(sent, got), "SELECT ?: sent {sent:?}, got {got:?}");
        }

        // Through a table.
        db.guest_execute("DELETE FROM t", Vec::new())
            .expect("the table is emptied");
        for (k, value) in values.iter().enumerate() {
            let changed = db
                .guest_execute(
                    "INSERT INTO t (k, v) VALUES (?1, ?2)",
                    vec![Value::Integer(k as i64), clone(value)],
                )
                .expect("a value is stored");
            assert_eq!(changed, 1);
        }
        let rows = db
            .guest_query("SELECT v FROM t ORDER BY k", Vec::new())
            .expect("the values are read");
        assert_eq!(rows.columns, vec!["v".to_owned()]);
        assert_eq!(rows.rows.len(), values.len());
        for (sent, row) in values.iter().zip(&rows.rows) {
            assert!(
                same(sent, &row[0]),
                "table: sent {sent:?}, got {:?}",
                row[0]
            );
        }
    });
});
