//! `GET /hearth/v1/metrics`: hearth's metrics in Prometheus' text format (behind SigV4 like
//! every route; `hearth metrics` prints them, and `hearth up --metrics-listen` serves the same
//! text without authentication on a listener of its own, for a Prometheus scraper).

use std::fmt::Write as _;

use crate::state::AppState;

/// Escapes a label value (backslash, quote, newline) as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The metrics text, as of `now_ms`.
pub fn render(state: &AppState, now_ms: u64) -> String {
    let (lanes, inflight) = state.events().all_stats();
    let mut out = String::new();
    family(
        &mut out,
        "hearth_async_attempts_in_flight",
        "gauge",
        "Asynchronous invocation attempts running now, over all functions.",
    );
    let _ = writeln!(out, "hearth_async_attempts_in_flight {inflight}");
    family(
        &mut out,
        "hearth_async_queue_depth",
        "gauge",
        "Events queued per function (ready, waiting for a retry, or running).",
    );
    for (f, st) in &lanes {
        let _ = writeln!(
            out,
            "hearth_async_queue_depth{{function=\"{}\"}} {}",
            label(f),
            st.depth
        );
    }
    family(
        &mut out,
        "hearth_async_oldest_event_age_seconds",
        "gauge",
        "Age of the oldest queued event per function (0 when none is queued).",
    );
    for (f, st) in &lanes {
        let age = st
            .oldest_accepted_ms
            .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
        let _ = writeln!(
            out,
            "hearth_async_oldest_event_age_seconds{{function=\"{}\"}} {age:.3}",
            label(f)
        );
    }
    for (name, help, get) in [
        (
            "hearth_async_succeeded_total",
            "Asynchronous invocations that succeeded, per function, since start.",
            (|c: &crate::events::sched::Counters| c.succeeded) as fn(&_) -> u64,
        ),
        (
            "hearth_async_failed_total",
            "Asynchronous invocations that failed for good (retries exhausted or too old).",
            |c| c.failed,
        ),
        (
            "hearth_async_retried_total",
            "Asynchronous attempts that failed and were scheduled again.",
            |c| c.retried,
        ),
        (
            "hearth_async_throttled_total",
            "Asynchronous attempts throttled and put back in the queue.",
            |c| c.throttled,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (f, st) in &lanes {
            let _ = writeln!(
                out,
                "{name}{{function=\"{}\"}} {}",
                label(f),
                get(&st.counters)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }
}
