//! Result rows and their rendering (aligned text or markdown).

/// Label of the reference figures.
pub const REFERENCE: &str = "NativeLink 1.6.6";

/// What Kiln aims for on a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    /// Throughput: at least `factor` x the reference.
    pub fn times_ref(reference: f64, factor: f64) -> Target {
        Target::AtLeast(reference * factor)
    }

    /// CPU or memory: at most `factor` x the reference.
    pub fn fraction_of_ref(reference: f64, factor: f64) -> Target {
        Target::AtMost(reference * factor)
    }

    pub fn met(&self, value: f64) -> Option<bool> {
        match *self {
            Target::None => None,
            Target::AtLeast(t) => Some(value >= t),
            Target::AtMost(t) => Some(value <= t),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub value: Option<f64>,
    pub reference: Option<f64>,
    pub target: Target,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, unit: &str, value: Option<f64>) -> Row {
        Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            unit: unit.to_string(),
            value,
            reference: None,
            target: Target::None,
        }
    }

    pub fn reference(mut self, r: f64) -> Row {
        self.reference = Some(r);
        self
    }

    pub fn target(mut self, t: Target) -> Row {
        self.target = t;
        self
    }

    fn ratio(&self) -> Option<f64> {
        match (self.value, self.reference) {
            (Some(v), Some(r)) if r != 0.0 => Some(v / r),
            _ => None,
        }
    }

    fn cells(&self) -> Vec<String> {
        let unit = |v: f64| format!("{} {}", fmt_num(v), self.unit);
        vec![
            self.scenario.clone(),
            self.metric.clone(),
            self.value.map(unit).unwrap_or_else(|| "n/a".into()),
            self.reference.map(unit).unwrap_or_default(),
            self.ratio().map(|r| format!("{r:.2}x")).unwrap_or_default(),
            match self.target {
                Target::None => String::new(),
                Target::AtLeast(t) => format!(">= {}", fmt_num(t)),
                Target::AtMost(t) => format!("<= {}", fmt_num(t)),
            },
            match self.value.and_then(|v| self.target.met(v)) {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => String::new(),
            },
        ]
    }
}

/// One scenario's rows plus free-form notes (latencies, errors, CPU shares).
#[derive(Debug, Clone, Default)]
pub struct ScenarioReport {
    pub name: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl ScenarioReport {
    pub fn new(name: &str) -> Self {
        ScenarioReport {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn row(&mut self, r: Row) {
        self.rows.push(r);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }
}

const HEADERS: [&str; 7] = [
    "scenario",
    "metric",
    "measured",
    REFERENCE,
    "ratio",
    "Kiln target",
    "met",
];

/// Renders all rows as one table followed by the notes.
pub fn render(reports: &[ScenarioReport], markdown: bool) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .flat_map(|r| r.rows.iter().map(Row::cells))
        .collect();
    let mut out = String::new();
    if markdown {
        out.push_str(&format!("| {} |\n", HEADERS.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(HEADERS.len())));
        for r in &rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
    } else {
        let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        out.push_str(&line(HEADERS.iter().map(|s| s.to_string()).collect()));
        out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
        for r in rows {
            out.push_str(&line(r));
        }
    }
    let any_notes = reports.iter().any(|r| !r.notes.is_empty());
    if any_notes {
        out.push('\n');
        for r in reports {
            for n in &r.notes {
                out.push_str(&format!("- {}: {n}\n", r.name));
            }
        }
    }
    out
}

/// Formats a figure: thousands separators for large values, 2-3
/// significant digits for small ones.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 1000.0 {
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut s = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                s.push(',');
            }
            s.push(ch);
        }
        if n < 0 {
            s.insert(0, '-');
        }
        s
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Quotes a command line so it can be pasted back into a shell.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(28_200.4), "28,200");
        assert_eq!(fmt_num(2_200_000.0), "2,200,000");
        assert_eq!(fmt_num(-1234.0), "-1,234");
        assert_eq!(fmt_num(540.2), "540");
        assert_eq!(fmt_num(41.26), "41.3");
        assert_eq!(fmt_num(0.6), "0.60");
        assert_eq!(fmt_num(0.0042), "0.0042");
        assert_eq!(fmt_num(0.0), "0.00");
    }

    #[test]
    fn targets() {
        assert_eq!(Target::times_ref(100.0, 1.5).met(150.0), Some(true));
        assert_eq!(Target::times_ref(100.0, 1.5).met(149.0), Some(false));
        assert_eq!(Target::fraction_of_ref(40.0, 0.5).met(20.0), Some(true));
        assert_eq!(Target::None.met(1.0), None);
    }

    #[test]
    fn table_renders_both_ways() {
        let mut r = ScenarioReport::new("ac-hit");
        r.row(
            Row::new("ac-hit", "throughput", "results/s", Some(50_000.0))
                .reference(28_200.0)
                .target(Target::times_ref(28_200.0, 1.5)),
        );
        r.row(Row::new("ac-hit", "p50", "µs", None));
        r.note("32 workers");
        let md = render(std::slice::from_ref(&r), true);
        assert!(md.contains(
            "| ac-hit | throughput | 50,000 results/s | 28,200 results/s | 1.77x | >= 42,300 | yes |"
        ));
        assert!(md.contains("| ac-hit | p50 | n/a |"));
        assert!(md.contains("- ac-hit: 32 workers"));
        let txt = render(&[r], false);
        assert!(txt.lines().next().unwrap().starts_with("scenario"));
        assert!(txt.contains("1.77x"));
    }

    #[test]
    fn quoting() {
        let args: Vec<String> = [
            "kiln-bench",
            "--server-cmd",
            "kiln serve --x 'y'",
            "--duration",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shell_line(&args),
            r"kiln-bench --server-cmd 'kiln serve --x '\''y'\''' --duration 5s"
        );
    }
}
