//! Reads Prometheus text exposition back into rows for the metrics page, so that the page
//! shows exactly what `/metrics` exposes, whoever rendered it.

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Family {
    pub(super) name: String,
    pub(super) help: String,
    pub(super) kind: String,
    /// `(labels, value)` as written, e.g. `(r#"status="prepared""#, "3")`.
    pub(super) samples: Vec<(String, String)>,
}

/// The families of `text` in order of appearance; samples before any `# HELP`/`# TYPE`
/// line get a family of their own name.
pub(super) fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            family(&mut families, name).help = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            family(&mut families, name).kind = kind.to_owned();
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, ""));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            // Histogram and summary series belong to their family's base name.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| families.iter().any(|f| f.name == *base))
                })
                .unwrap_or(name);
            let label = if base == name {
                labels.to_owned()
            } else {
                format!(
                    "{}{}{labels}",
                    &name[base.len() + 1..],
                    if labels.is_empty() { "" } else { " " }
                )
            };
            family(&mut families, base)
                .samples
                .push((label, value.to_owned()));
        }
    }
    families
}

fn family<'f>(families: &'f mut Vec<Family>, name: &str) -> &'f mut Family {
    let index = match families.iter().position(|f| f.name == name) {
        Some(index) => index,
        None => {
            families.push(Family {
                name: name.to_owned(),
                help: String::new(),
                kind: String::new(),
                samples: Vec::new(),
            });
            families.len() - 1
        }
    };
    &mut families[index]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_families_samples_and_histograms() {
        let text = "# HELP a_total things\n# TYPE a_total counter\na_total 3\n\
                    # HELP m messages per status\n# TYPE m gauge\nm{status=\"prepared\"} 1\nm{status=\"delivered\"} 2\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 4\nh_sum 2.5\nh_count 4\nloose 7\n";
        let families = parse(text);
        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a_total", "m", "h", "loose"]);
        assert_eq!(families[0].help, "things");
        assert_eq!(families[0].kind, "counter");
        assert_eq!(
            families[1].samples[1],
            ("status=\"delivered\"".to_owned(), "2".to_owned())
        );
        assert_eq!(families[2].samples[0].0, "bucket le=\"1\"");
        assert_eq!(families[2].samples[2], ("count".to_owned(), "4".to_owned()));
        assert_eq!(families[3].samples[0].1, "7");
    }
}
