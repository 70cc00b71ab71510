//! Properties checked against the real PostgreSQL with generated hostile input: whatever the
//! validator accepts, PostgreSQL inserts; and for numbers, the validator refuses exactly what
//! PostgreSQL's `jsonb` refuses.

use std::time::Duration;

use crate::store::{Store, lock_order};
use chrono::{NaiveDate, Utc};
use dedup_event::KeySpec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use test_support::TestEnv;
use test_support::events::event;

/// Pieces of a JSON string's contents: plain text, escapes PostgreSQL takes, and the ones it
/// refuses (NUL, unpaired surrogates).
fn string_text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "a",
        "é",
        "😀",
        "\\u0000",
        "\\ud800",
        "\\udc00",
        "\\ud83d\\ude00",
        "\\n",
        "\\\\",
        "\\\"",
        "\\u0041",
        "\\ud800\\u0041",
        "\\u00e9",
        " ",
    ]);
    prop::collection::vec(piece, 0..6).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

/// JSON numbers around `numeric`'s limits: digits before and after the point, exponents at
/// and past the edges.
fn number_text() -> impl Strategy<Value = String> {
    let integer = prop_oneof![
        prop::sample::select(vec!["0", "1", "9", "12345", "10"]).prop_map(String::from),
        (1usize..40).prop_map(|n| "7".repeat(n)),
    ];
    let fraction = prop_oneof![
        Just(String::new()),
        prop::sample::select(vec![".5", ".05", ".000", ".1234567890"]).prop_map(String::from),
    ];
    let exponent = prop_oneof![
        Just(String::new()),
        prop::sample::select(vec![
            -20000i64,
            -16384,
            -16383,
            -16382,
            -16380,
            -400,
            -1,
            0,
            1,
            400,
            131_030,
            131_069,
            131_070,
            131_071,
            131_072,
            999_999,
            1_073_741_823,
        ])
        .prop_map(|e| format!("e{e}")),
        prop::sample::select(vec!["E+3", "e-0", "e+131071"]).prop_map(String::from),
    ];
    (any::<bool>(), integer, fraction, exponent)
        .prop_map(|(negative, i, f, e)| format!("{}{i}{f}{e}", if negative { "-" } else { "" }))
}

/// Any member value: strings, numbers, literals, nested arrays and objects (sometimes past
/// the nesting limit).
fn value_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        string_text(),
        number_text(),
        prop::sample::select(vec!["true", "false", "null"]).prop_map(String::from),
    ];
    let depth = prop_oneof![4 => 0usize..4, 1 => 120usize..135];
    (leaf, depth, any::<bool>()).prop_map(|(leaf, depth, objects)| {
        let (open, close) = if objects {
            ("{\"k\":", "}")
        } else {
            ("[", "]")
        };
        format!("{}{leaf}{}", open.repeat(depth), close.repeat(depth))
    })
}

/// A valid event with one hostile member, and sometimes a hostile `sid` or member name.
fn event_text() -> impl Strategy<Value = String> {
    (
        value_text(),
        prop::option::of(string_text()),
        prop::option::of(string_text()),
    )
        .prop_map(|(value, sid, name)| {
            let base = event("p").to_string();
            let base = match sid {
                Some(sid) => base.replacen(r#""sid":"session-123""#, &format!(r#""sid":{sid}"#), 1),
                None => base,
            };
            let name = name.unwrap_or_else(|| "\"x\"".to_owned());
            base.replacen('{', &format!("{{{name}:{value},"), 1)
        })
}

/// Accepted by the validator ⇒ inserted by the real PostgreSQL through the worker's own
/// statement (nothing refused), for batches of generated hostile events.
#[test]
fn accepted_events_are_inserted_by_postgres() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let env = runtime.block_on(TestEnv::new("propstore"));
    let _context = runtime.enter();
    let store =
        Store::connect_lazy(&env.database_url, 2, Duration::from_secs(30), None).expect("store");
    runtime.block_on(store.migrate()).expect("migrations");
    let spec = KeySpec::default();
    let accepted_total = std::cell::Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&prop::collection::vec(event_text(), 1..12), |texts| {
        let mut body = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            // Each its own key, so every accepted event is a new row.
            let text = text.replacen(r#""r":"p""#, &format!(r#""r":"p-{}""#, i), 1);
            body.extend_from_slice(text.as_bytes());
            body.push(b'\n');
        }
        let days = NaiveDate::MIN..=NaiveDate::MAX;
        let decoded = crate::batch::decode(
            [(&body[..], None, crate::batch::NO_SOURCES)],
            &spec,
            &days,
            Utc::now(),
        );
        let mut rows: Vec<_> = decoded.candidates.iter().map(|c| c.row()).collect();
        lock_order(&mut rows);
        let inserted = runtime
            .block_on(store.insert_isolating(&rows))
            .expect("no connection failure");
        prop_assert!(
            inserted.refused.is_empty(),
            "PostgreSQL refused accepted events: {:?}",
            inserted
                .refused
                .iter()
                .map(|(i, why)| (
                    why.clone(),
                    rows[*i].payload.chars().take(200).collect::<String>()
                ))
                .collect::<Vec<_>>()
        );
        accepted_total.set(accepted_total.get() + rows.len());
        runtime
            .block_on(sqlx::query("TRUNCATE product_events").execute(&env.pg))
            .expect("truncate");
        Ok(())
    });
    outcome.expect("the property holds");
    let accepted_total = accepted_total.get();
    assert!(
        accepted_total > 50,
        "the generator produced too few valid events ({accepted_total})"
    );
}

/// For numbers, the validator and PostgreSQL's `jsonb` input agree both ways: nothing
/// PostgreSQL takes is refused, nothing it refuses is accepted.
#[test]
fn number_limits_match_postgres_exactly() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let env = runtime.block_on(TestEnv::new("propnumbers"));
    runtime
        .block_on(
            sqlx::query(
                "CREATE FUNCTION jsonb_ok(t text) RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM t::jsonb; RETURN true; EXCEPTION WHEN others THEN RETURN false; END $$",
            )
            .execute(&env.pg),
        )
        .expect("function");
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&prop::collection::vec(number_text(), 1..24), |numbers| {
        let postgres: Vec<bool> = runtime
            .block_on(
                sqlx::query_scalar("SELECT jsonb_ok(n) FROM unnest($1::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i")
                    .bind(&numbers)
                    .fetch_all(&env.pg),
            )
            .expect("ask PostgreSQL");
        for (number, postgres_ok) in numbers.iter().zip(postgres) {
            let ours = dedup_event::storable::check(number.as_bytes(), 0).is_ok();
            prop_assert_eq!(ours, postgres_ok, "{}", number);
        }
        Ok(())
    });
    outcome.expect("the validator agrees with PostgreSQL");
}
