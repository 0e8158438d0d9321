//! Training history (JSON) and the plots made from it and from ROC curves.
//!
//! Plots are SVG, rendered to memory and then written like every other output
//! here: to a temporary file beside the target and renamed over it, so an
//! interrupted run never leaves a half-written file behind.

use std::fs;
use std::io;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::metrics::{nan_as_null, RocPoint};

/// One epoch of one training phase.
///
/// Non-finite numbers (a diverged loss) are written to JSON as `null`; the
/// plain fields read them back as NaN, the optional ones as `None`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EpochRecord {
    /// Name of the training phase, e.g. "head" or "fine-tune".
    pub phase: String,
    /// 1-based within the run (phase).
    pub epoch: usize,
    #[serde(with = "nan_as_null")]
    pub lr: f64,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// ROC AUC of the validation images, where both classes are present.
    #[serde(default)]
    pub val_auc: Option<f64>,
    /// ROC AUC of the validation images under the weight average, when one is kept.
    #[serde(default)]
    pub averaged_val_auc: Option<f64>,
    #[serde(with = "nan_as_null")]
    pub seconds: f64,
}

/// Every epoch of a training run, phases in the order they ran.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct History {
    pub epochs: Vec<EpochRecord>,
}

impl History {
    /// Writes pretty JSON atomically (see [`crate::write_atomically`]), so saving after
    /// every epoch can never destroy the previous good copy.
    pub fn save_json(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        crate::write_atomically(path.as_ref(), &json)
    }

    /// Reads a history written by [`History::save_json`]. Malformed JSON is
    /// an `InvalidData` error naming the file.
    pub fn load_json(path: impl AsRef<Path>) -> io::Result<History> {
        let path = path.as_ref();
        let bytes = fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("plotting failed: {0}")]
    Plot(String),
}

/// plotters' errors are generic over the backend; only the message matters.
impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ReportError {
    fn from(error: DrawingAreaErrorKind<E>) -> Self {
        ReportError::Plot(error.to_string())
    }
}

const TRAINING_COLOUR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_COLOUR: RGBColor = RGBColor(255, 127, 14);
const PHASE_COLOUR: RGBColor = RGBColor(128, 128, 128);
const FONT: &str = "sans-serif";

/// Loss and accuracy side by side, training and validation per panel, over
/// the global epoch index (1, 2, … across all phases). A grey vertical line
/// marks each change of phase and every phase is named at its start.
/// Missing, non-finite or absurd (beyond ±1e100) values leave a gap; a
/// history without validation values has no validation line or legend entry;
/// an empty history gives empty panels saying "no epochs recorded".
pub fn plot_history(history: &History, title: &str, path: &Path) -> Result<(), ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 24))?;
        let panels = body.split_evenly((1, 2));
        let epochs = &history.epochs;
        let loss = Panel {
            caption: "loss",
            training: epochs.iter().map(|e| Some(e.train_loss)).collect(),
            validation: epochs.iter().map(|e| e.val_loss).collect(),
            floor: 0.0,
            ceiling: None,
            legend_position: SeriesLabelPosition::UpperRight,
        };
        let accuracy = Panel {
            caption: "accuracy",
            training: epochs.iter().map(|e| Some(e.train_accuracy)).collect(),
            validation: epochs.iter().map(|e| e.val_accuracy).collect(),
            floor: 0.0,
            ceiling: Some(1.0),
            legend_position: SeriesLabelPosition::LowerRight,
        };
        let phases: Vec<&str> = epochs.iter().map(|e| e.phase.as_str()).collect();
        draw_panel(&panels[0], &loss, &phases)?;
        draw_panel(&panels[1], &accuracy, &phases)?;
        root.present()?;
    }
    crate::write_atomically(path, svg.as_bytes())?;
    Ok(())
}

/// Values a chart can show. Beyond ±1e100 (a diverged loss) the axis range
/// could overflow to infinity, on which plotters' tick search never ends, so
/// such values are left out like missing ones.
fn plottable(value: f64) -> bool {
    value.is_finite() && value.abs() <= 1e100
}

/// One panel of [`plot_history`]: values indexed by global epoch − 1.
struct Panel {
    caption: &'static str,
    training: Vec<Option<f64>>,
    validation: Vec<Option<f64>>,
    /// The y axis always includes `floor` (and `ceiling` if given), so that
    /// e.g. accuracy is shown against its whole 0–1 scale.
    floor: f64,
    ceiling: Option<f64>,
    legend_position: SeriesLabelPosition,
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel, phases: &[&str]) -> Result<(), ReportError> {
    let n = phases.len();
    let finite = || {
        panel
            .training
            .iter()
            .chain(&panel.validation)
            .flatten()
            .copied()
            .filter(|&v| plottable(v))
    };
    let low = finite().fold(panel.floor, f64::min);
    let high = finite().fold(panel.ceiling.unwrap_or(f64::NEG_INFINITY), f64::max);
    let (low, high) = if high > low {
        (low, high + 0.05 * (high - low))
    } else {
        (low, low + 1.0)
    };
    let x_range = 0.5..(n.max(1) as f64 + 0.5);

    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x_range, low..high)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(panel.caption)
        .x_labels(n.clamp(2, 12))
        // Half-epoch ticks would print as duplicates of their neighbours.
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .draw()?;

    for (start, phase) in phases.iter().enumerate() {
        if start > 0 && phases[start - 1] == *phase {
            continue;
        }
        let boundary = start as f64 + 0.5;
        if start > 0 {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(boundary, low), (boundary, high)],
                PHASE_COLOUR.stroke_width(2),
            )))?;
        }
        let label = (FONT, 14).into_font().color(&PHASE_COLOUR);
        chart.draw_series(std::iter::once(
            EmptyElement::at((boundary, high)) + Text::new(phase.to_string(), (5, 5), label),
        ))?;
    }

    draw_line(&mut chart, &panel.training, "training", TRAINING_COLOUR)?;
    if panel.validation.iter().flatten().any(|&v| plottable(v)) {
        draw_line(&mut chart, &panel.validation, "validation", VALIDATION_COLOUR)?;
    }
    if n == 0 {
        let note = (FONT, 16).into_font().color(&BLACK);
        chart.draw_series(std::iter::once(Text::new(
            "no epochs recorded",
            (0.8, (low + high) / 2.0),
            note,
        )))?;
    }
    chart
        .configure_series_labels()
        .position(panel.legend_position.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Lines through consecutive finite values (a gap where one is missing), a
/// dot on every value so lone points stay visible, and the legend entry —
/// always present, even with no values at all.
fn draw_line(
    chart: &mut Chart<'_, '_>,
    values: &[Option<f64>],
    name: &str,
    colour: RGBColor,
) -> Result<(), ReportError> {
    let points: Vec<Option<(f64, f64)>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| v.filter(|&v| plottable(v)).map(|v| (i as f64 + 1.0, v)))
        .collect();
    for run in points.split(Option::is_none) {
        if run.len() > 1 {
            chart.draw_series(LineSeries::new(run.iter().flatten().copied(), colour.stroke_width(2)))?;
        }
    }
    chart
        .draw_series(points.iter().flatten().map(|&p| Circle::new(p, 3, colour.filled())))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    Ok(())
}

type UnitSquare<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A square chart over [0, 1]² with a grey diagonal named `diagonal`, the
/// series that `draw` adds, and their legend at `legend`, written as SVG.
fn unit_square_plot(
    path: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    diagonal: &str,
    legend: SeriesLabelPosition,
    draw: impl FnOnce(&mut UnitSquare) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FONT, 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], PHASE_COLOUR.stroke_width(1)))?
            .label(diagonal)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PHASE_COLOUR));
        draw(&mut chart)?;
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()?;
        root.present()?;
    }
    crate::write_atomically(path, svg.as_bytes())?;
    Ok(())
}

/// Several ROC curves in one SVG with the chance diagonal, each named
/// "name (AUC 0.83)" in the legend ("AUC n/a" when undefined).
pub fn plot_roc(curves: &[(String, Vec<RocPoint>, Option<f64>)], path: &Path) -> Result<(), ReportError> {
    let axes = (
        "false positive rate (1 - specificity)",
        "true positive rate (sensitivity)",
    );
    unit_square_plot(
        path,
        "ROC, abnormal vs normal",
        axes,
        "chance",
        SeriesLabelPosition::LowerRight,
        |chart| {
            for (index, (name, points, auc)) in curves.iter().enumerate() {
                let colour = Palette99::pick(index).to_rgba();
                let label = match auc {
                    Some(auc) => format!("{name} (AUC {auc:.2})"),
                    None => format!("{name} (AUC n/a)"),
                };
                chart
                    .draw_series(LineSeries::new(
                        points.iter().map(|p| (p.fpr, p.tpr)),
                        colour.stroke_width(2),
                    ))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
            Ok(())
        },
    )
}

/// A reliability diagram: for each named series, the observed positive rate
/// of each probability bin against the bin's mean probability (dot size by
/// share of the images), with the diagonal a calibrated model lies on.
pub fn plot_reliability(
    series: &[(String, Vec<crate::calibration::ReliabilityBin>, f64)],
    path: &Path,
) -> Result<(), ReportError> {
    let axes = ("predicted P(abnormal), bin mean", "observed fraction abnormal");
    unit_square_plot(
        path,
        "Reliability, P(abnormal)",
        axes,
        "perfectly calibrated",
        SeriesLabelPosition::UpperLeft,
        |chart| {
            for (index, (name, bins, ece)) in series.iter().enumerate() {
                let colour = Palette99::pick(index).to_rgba();
                let total = bins.iter().map(|b| b.count).sum::<usize>().max(1) as f64;
                let filled: Vec<_> = bins.iter().filter(|b| b.count > 0).collect();
                chart
                    .draw_series(LineSeries::new(
                        filled.iter().map(|b| (b.mean_probability, b.observed)),
                        colour.stroke_width(2),
                    ))?
                    .label(format!("{name} (ECE {ece:.3})"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
                chart.draw_series(filled.iter().map(|b| {
                    let radius = (3.0 + 12.0 * (b.count as f64 / total).sqrt()) as i32;
                    Circle::new((b.mean_probability, b.observed), radius, colour.mix(0.5).filled())
                }))?;
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: &str, epoch: usize, loss: f64, val: Option<(f64, f64)>) -> EpochRecord {
        EpochRecord {
            phase: phase.to_string(),
            epoch,
            lr: 1e-3,
            train_loss: loss,
            train_accuracy: 1.0 - loss / 2.0,
            val_loss: val.map(|v| v.0),
            val_accuracy: val.map(|v| v.1),
            val_auc: None,
            averaged_val_auc: None,
            seconds: 12.5,
        }
    }

    fn two_phase_history() -> History {
        History {
            epochs: vec![
                record("head", 1, 0.69, Some((0.68, 0.55))),
                record("head", 2, 0.60, Some((0.62, 0.63))),
                record("fine-tune", 1, 0.50, Some((0.55, 0.70))),
                record("fine-tune", 2, 0.41, None),
                record("fine-tune", 3, 0.35, Some((0.50, 0.74))),
            ],
        }
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).expect("plot written")
    }

    /// The content of every `<text>` element (plotters puts it on its own
    /// line), still XML-escaped.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|element| {
                let content = element.split_once('>')?.1;
                Some(content.split_once("</text>")?.0.trim().to_string())
            })
            .collect()
    }

    fn count(texts: &[String], wanted: &str) -> usize {
        texts.iter().filter(|t| *t == wanted).count()
    }

    #[test]
    fn history_json_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("history.json");
        let mut history = two_phase_history();
        history.epochs[1].train_loss = f64::NAN; // a diverged epoch
        history.save_json(&path).expect("save");
        let back = History::load_json(&path).expect("load");
        assert_eq!(back.epochs.len(), 5);
        assert!(back.epochs[1].train_loss.is_nan());
        assert_eq!(back.epochs[2].phase, "fine-tune");
        assert_eq!(back.epochs[4].epoch, 3);
        assert_eq!(back.epochs[3].val_loss, None);
        assert_eq!(back.epochs[4].val_accuracy, Some(0.74));
        assert_eq!(back.epochs[0].train_loss, 0.69);
        // Only the target remains: the temporary was renamed, not left over.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("history.json")]);
    }

    #[test]
    fn save_replaces_and_load_reports_bad_json() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("history.json");
        two_phase_history().save_json(&path).expect("save");
        History::default().save_json(&path).expect("overwrite");
        assert!(History::load_json(&path).expect("load").epochs.is_empty());
        fs::write(&path, "{\"epochs\": [").expect("write");
        let error = History::load_json(&path).expect_err("truncated JSON");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("history.json"), "{error}");
        let missing = dir.path().join("no such dir").join("h.json");
        assert!(History::default().save_json(&missing).is_err());
        assert!(History::load_json(&missing).is_err());
    }

    #[test]
    fn history_plot_has_both_panels_legends_and_phases() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("history.svg");
        plot_history(&two_phase_history(), "DenseNet-121 fold 3", &path).expect("plot");
        let svg = read(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        let texts = texts(&svg);
        assert_eq!(count(&texts, "DenseNet-121 fold 3"), 1);
        // Per panel: caption, legend, phase names, axis title.
        for text in ["training", "validation", "head", "fine-tune", "epoch"] {
            assert_eq!(count(&texts, text), 2, "{text} in {texts:?}");
        }
        // Caption and y-axis title.
        assert_eq!(count(&texts, "loss"), 2);
        assert_eq!(count(&texts, "accuracy"), 2);
        assert_eq!(count(&texts, "no epochs recorded"), 0);
        // One phase boundary per panel, drawn as a grey vertical line.
        assert_eq!(svg.matches("stroke=\"#808080\"").count(), 2, "phase markers");
    }

    #[test]
    fn history_plot_without_validation_has_no_validation_legend() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("history.svg");
        let history = History {
            epochs: vec![record("head", 1, 0.7, None), record("head", 2, f64::NAN, None)],
        };
        plot_history(&history, "no validation", &path).expect("plot");
        let texts = texts(&read(&path));
        assert_eq!(count(&texts, "training"), 2, "{texts:?}");
        assert_eq!(count(&texts, "validation"), 0, "validation drawn without data");
        assert_eq!(count(&texts, "head"), 2);
    }

    #[test]
    fn history_plot_survives_extreme_values() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("extreme.svg");
        // Axis ranges from these would overflow: plotters would hang.
        let mut diverged = record("head", 1, f64::MAX, Some((f64::INFINITY, f64::NAN)));
        diverged.train_accuracy = -f64::MAX;
        let history = History {
            epochs: vec![diverged, record("", 2, 0.3, Some((0.2, 0.9)))],
        };
        plot_history(&history, "diverged", &path).expect("plot");
        let texts = texts(&read(&path));
        assert_eq!(count(&texts, "validation"), 2);
        assert_eq!(count(&texts, "head"), 2);
    }

    #[test]
    fn empty_history_plot_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("empty.svg");
        plot_history(&History::default(), "empty", &path).expect("plot");
        let svg = read(&path);
        assert!(svg.starts_with("<svg"));
        let texts = texts(&svg);
        assert_eq!(count(&texts, "no epochs recorded"), 2, "{texts:?}");
        assert_eq!(count(&texts, "training"), 2);
        assert_eq!(count(&texts, "empty"), 1);
    }

    #[test]
    fn roc_plot_names_curves_with_auc() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("roc.svg");
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        let curve = crate::metrics::roc_curve(&scores, &labels);
        let curves = vec![
            (
                "fold 1".to_string(),
                curve.clone(),
                crate::metrics::roc_auc(&scores, &labels),
            ),
            ("fold 2".to_string(), curve, Some(0.8349)),
            ("A&B <mean>".to_string(), Vec::new(), None),
        ];
        plot_roc(&curves, &path).expect("plot");
        let labels = texts(&read(&path));
        for text in [
            "fold 1 (AUC 0.75)",
            "fold 2 (AUC 0.83)",
            "A&amp;B &lt;mean&gt; (AUC n/a)",
            "chance",
        ] {
            assert_eq!(count(&labels, text), 1, "{text} in {labels:?}");
        }
        plot_roc(&[], &path).expect("plot without curves");
        assert_eq!(count(&texts(&read(&path)), "chance"), 1);
    }

    #[test]
    fn plot_into_missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing").join("roc.svg");
        assert!(matches!(plot_roc(&[], &path), Err(ReportError::Io(_))));
        assert!(matches!(
            plot_history(&History::default(), "x", &path),
            Err(ReportError::Io(_))
        ));
    }
}
