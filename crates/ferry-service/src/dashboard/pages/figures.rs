//! How figures are written on the pages.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

/// A duration in seconds as people read it: `850 ms`, `12.5 s`, `4 min`, `3.2 h`, `2.1 d`.
pub(in crate::dashboard) fn age(secs: f64) -> String {
    match secs {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 60.0 => format!("{s:.1} s"),
        s if s < 3600.0 => format!("{:.0} min", s / 60.0),
        s if s < 86_400.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

/// How far `at` is from now, either way.
pub(super) fn duration_since(at: DateTime<Utc>) -> String {
    let millis = (at - Utc::now()).num_milliseconds().unsigned_abs();
    age(millis as f64 / 1000.0)
}

pub(in crate::dashboard) fn rate(per_sec: f64) -> String {
    format!("{per_sec:.1}/s")
}

pub(super) fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A small inline SVG line of `values` (the oldest on the left), scaled to its maximum.
pub(super) fn sparkline(values: &[u64]) -> Markup {
    const WIDTH: f64 = 120.0;
    const HEIGHT: f64 = 24.0;
    if values.len() < 2 {
        return html! {};
    }
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = WIDTH / (values.len() - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                HEIGHT - (*v as f64 / max) * HEIGHT
            )
        })
        .collect();
    html! {
        svg.spark width="120" height="24" viewBox="0 -1 120 26" role="img" aria-label="recent backlog" {
            polyline fill="none" stroke="currentColor" stroke-width="1.5" points=(points.join(" ")) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(0.25), "250 ms");
        assert_eq!(age(12.34), "12.3 s");
        assert_eq!(age(240.0), "4 min");
        assert_eq!(age(7200.0), "2.0 h");
        assert_eq!(rate(2.0), "2.0/s");
        assert!(sparkline(&[1]).into_string().is_empty());
        assert!(
            sparkline(&[0, 2, 1])
                .into_string()
                .contains("0.0,24.0 60.0,0.0 120.0,12.0")
        );
    }
}
