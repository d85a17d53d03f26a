//! The data: red wine quality (Cortez et al., 2009; 1599 wines, 11
//! physico-chemical features, quality graded 3–8), shipped inside the
//! `linfa-datasets` crate so that nothing is downloaded at run time.
//!
//! The file holds 240 exact duplicates (1599 rows, 1359 distinct, no two
//! copies with different grades). They are dropped before splitting: a random
//! split would otherwise put copies of training wines into the validation and
//! test sets, where a model that memorises its training rows scores them for
//! free, and the held-out error would reward overfitting.
//!
//! Then one fixed, seeded split into train / validation / test, and features
//! standardised with the mean and standard deviation of the **training** rows
//! only, so that nothing about the validation or test rows leaks into
//! training.

use ndarray::{Array2, ArrayView2, Axis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// What is predicted from the 11 features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Two classes: quality ≥ 6 ("good") against ≤ 5.
    Good,
    /// Six classes: the quality grade itself, 3 to 8 (very unbalanced: the
    /// file holds 10, 53, 681, 638, 199 and 18 wines of each).
    Quality,
}

impl Task {
    /// Number of classes.
    pub fn classes(self) -> usize {
        match self {
            Task::Good => 2,
            Task::Quality => 6,
        }
    }

    /// The class of a wine of quality grade `quality`.
    pub fn label(self, quality: usize) -> usize {
        match self {
            Task::Good => usize::from(quality >= 6),
            Task::Quality => quality.saturating_sub(3).min(5),
        }
    }

    /// A short description for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Task::Good => "good (quality >= 6) vs not",
            Task::Quality => "quality grade 3-8, 6 classes",
        }
    }
}

/// Rows of standardised features and their class labels.
#[derive(Clone, Debug)]
pub struct Split {
    /// One row per sample, standardised.
    pub x: Array2<f32>,
    /// Class of each row.
    pub y: Vec<usize>,
    /// Index of each row in the original data set (read by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub rows: Vec<usize>,
}

impl Split {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Fraction of rows whose prediction differs from the label.
    pub fn error_rate(&self, predicted: &[usize]) -> f64 {
        debug_assert_eq!(predicted.len(), self.y.len());
        let wrong = self.y.iter().zip(predicted).filter(|(y, p)| y != p).count();
        wrong as f64 / self.y.len().max(1) as f64
    }
}

/// The three splits and what they are about.
#[derive(Clone, Debug)]
pub struct Data {
    /// Rows the model is fitted on.
    pub train: Split,
    /// Rows the hyper-parameter defaults were chosen on.
    pub val: Split,
    /// Rows reported as the test error, and never used for any choice.
    pub test: Split,
    /// Number of features per row.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Exact duplicate rows dropped before splitting.
    pub duplicates_dropped: usize,
}

/// Fractions of the rows that go to the validation and the test split; the
/// rest is training data (60 / 20 / 20).
pub const VAL_FRACTION: f64 = 0.2;
/// See [`VAL_FRACTION`].
pub const TEST_FRACTION: f64 = 0.2;

/// Loads the red wine data set, drops exact duplicate rows and splits the
/// rest with `split_seed`.
pub fn load(task: Task, split_seed: u64) -> Data {
    let dataset = linfa_datasets::winequality();
    let keep = first_occurrences(dataset.records.view());
    let records = dataset.records.select(Axis(0), &keep);
    let labels: Vec<usize> = keep
        .iter()
        .map(|&r| task.label(dataset.targets[r]))
        .collect();
    let mut data = split_and_standardise(records.view(), &labels, task.classes(), split_seed);
    data.duplicates_dropped = dataset.records.nrows() - keep.len();
    data
}

/// Indices of the rows that are not an exact copy of an earlier row.
pub fn first_occurrences(records: ArrayView2<'_, f64>) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    records
        .rows()
        .into_iter()
        .enumerate()
        .filter(|(_, row)| seen.insert(row.iter().map(|v| v.to_bits()).collect::<Vec<u64>>()))
        .map(|(r, _)| r)
        .collect()
}

/// Shuffles the rows with `seed`, cuts them 60 / 20 / 20 and standardises
/// every split with the training rows' per-feature mean and standard
/// deviation (a constant feature is only centred).
pub fn split_and_standardise(
    records: ArrayView2<'_, f64>,
    labels: &[usize],
    classes: usize,
    seed: u64,
) -> Data {
    let n = records.nrows();
    assert_eq!(n, labels.len(), "one label per row");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_val = (n as f64 * VAL_FRACTION).round() as usize;
    let n_test = (n as f64 * TEST_FRACTION).round() as usize;
    let n_train = n - n_val - n_test;
    let (train_rows, rest) = order.split_at(n_train);
    let (val_rows, test_rows) = rest.split_at(n_val);

    let train_x = records.select(Axis(0), train_rows);
    let mean = train_x
        .mean_axis(Axis(0))
        .expect("training split is not empty");
    let std = train_x.std_axis(Axis(0), 0.0);
    let scale = std.mapv(|s| if s > 0.0 { 1.0 / s } else { 1.0 });

    let make = |rows: &[usize]| Split {
        x: ((&records.select(Axis(0), rows) - &mean) * &scale).mapv(|v| v as f32),
        y: rows.iter().map(|&r| labels[r]).collect(),
        rows: rows.to_vec(),
    };
    Data {
        train: make(train_rows),
        val: make(val_rows),
        test: make(test_rows),
        features: records.ncols(),
        classes,
        duplicates_dropped: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wine_splits_partition_the_rows_and_are_seeded() {
        let a = load(Task::Good, 7);
        assert_eq!(a.features, 11);
        // 1599 rows of which 240 are exact copies of earlier ones.
        assert_eq!(a.duplicates_dropped, 240);
        assert_eq!(a.train.len() + a.val.len() + a.test.len(), 1359);
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (815, 272, 272));
        // Row indices refer to the deduplicated table; no row appears twice.
        let mut rows: Vec<usize> = [&a.train, &a.val, &a.test]
            .iter()
            .flat_map(|s| s.rows.clone())
            .collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..1359).collect::<Vec<_>>());
        let dataset = linfa_datasets::winequality();
        let again = first_occurrences(dataset.records.view());
        let distinct = dataset.records.select(Axis(0), &again);
        assert_eq!(first_occurrences(distinct.view()).len(), 1359);
        let b = load(Task::Good, 7);
        assert_eq!(a.test.x, b.test.x);
        assert_eq!(a.test.y, b.test.y);
        let c = load(Task::Good, 8);
        assert_ne!(a.test.x, c.test.x);
        let q = load(Task::Quality, 7);
        assert!(q.train.y.iter().all(|&y| y < 6));
        assert_eq!(q.train.x, a.train.x);
    }

    #[test]
    fn statistics_come_from_the_training_rows_only() {
        // Ten rows: feature 0 = row index, feature 1 constant.
        let records = Array2::from_shape_fn((10, 2), |(r, c)| if c == 0 { r as f64 } else { 3.0 });
        let labels: Vec<usize> = (0..10).map(|r| r % 2).collect();
        let data = split_and_standardise(records.view(), &labels, 2, 1);
        assert_eq!(
            (data.train.len(), data.val.len(), data.test.len()),
            (6, 2, 2)
        );
        let mut all: Vec<usize> = [&data.train, &data.val, &data.test]
            .iter()
            .flat_map(|s| s.rows.clone())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // Expected statistics: those of the training rows' raw values alone.
        let raw: Vec<f64> = data.train.rows.iter().map(|&r| r as f64).collect();
        let mean = raw.iter().sum::<f64>() / 6.0;
        let std = (raw.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0).sqrt();
        for split in [&data.train, &data.val, &data.test] {
            for (i, &r) in split.rows.iter().enumerate() {
                let expected = (r as f64 - mean) / std;
                assert!((split.x[[i, 0]] as f64 - expected).abs() < 1e-6);
                // A constant feature is centred, not divided by zero.
                assert_eq!(split.x[[i, 1]], 0.0);
                assert_eq!(split.y[i], labels[r]);
            }
        }
    }

    #[test]
    fn first_occurrences_drops_later_copies() {
        let records = ndarray::array![[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [1.0, 2.5], [3.0, 4.0]];
        assert_eq!(first_occurrences(records.view()), vec![0, 1, 3]);
    }

    #[test]
    fn error_rate_counts_mismatches() {
        let split = Split {
            x: Array2::zeros((4, 1)),
            y: vec![0, 1, 1, 0],
            rows: vec![0, 1, 2, 3],
        };
        assert_eq!(split.error_rate(&[0, 1, 0, 0]), 0.25);
        assert_eq!(split.error_rate(&[0, 1, 1, 0]), 0.0);
    }
}
