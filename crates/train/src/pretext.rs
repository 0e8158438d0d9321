//! A self-supervised first stage: labels the images give themselves, for a
//! network trained from random weights to learn what X-rays look like before it
//! meets the few real labels (its weights then start `train --init`).
//!
//! [`rotation`]: every image twice, upright (negative) and turned by a quarter,
//! half or three-quarter turn (positive). Telling them apart takes the shapes and
//! orientation of bones and joints, which a fracture detector needs as well.

use image::{imageops, Rgb32FImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dataset::{Dataset, Sample};

/// The class names of the rotation task's model card.
pub const ROTATION_CLASSES: (&str, &str) = ("upright", "turned");

/// The rotation task on `dataset`'s (decoded, square) `images`: each sample
/// upright, then turned by a number of quarter turns drawn from `seed`. A copy
/// keeps its image's group, so a patient stays on one side of any split.
pub fn rotation(dataset: &Dataset, images: &[Rgb32FImage], seed: u64) -> (Dataset, Vec<Rgb32FImage>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut samples = Vec::with_capacity(2 * images.len());
    let mut turned = Vec::with_capacity(2 * images.len());
    for (sample, image) in dataset.samples.iter().zip(images) {
        for positive in [false, true] {
            samples.push(Sample {
                positive,
                ..sample.clone()
            });
        }
        turned.push(image.clone());
        turned.push(match rng.random_range(1..=3) {
            1 => imageops::rotate90(image),
            2 => imageops::rotate180(image),
            _ => imageops::rotate270(image),
        });
    }
    let (negative, positive) = ROTATION_CLASSES;
    let task = Dataset {
        samples,
        classes: fracture_core::Classes {
            negative: negative.into(),
            positive: positive.into(),
        },
        ..dataset.clone()
    };
    (task, turned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Layout;
    use image::Rgb;

    fn dataset(images: usize) -> Dataset {
        Dataset {
            root: "data".into(),
            layout: Layout::Mura,
            classes: Default::default(),
            samples: (0..images)
                .map(|i| Sample {
                    path: format!("data/patient{i}/study1_positive/image1.png").into(),
                    positive: true,
                    group: i / 2,
                })
                .collect(),
            group_names: (0..images.div_ceil(2)).map(|g| format!("patient{g}")).collect(),
            has_patients: true,
            skipped: Vec::new(),
        }
    }

    /// An image whose every pixel says where it is, so any turn shows.
    fn marked(side: u32, shade: f32) -> Rgb32FImage {
        Rgb32FImage::from_fn(side, side, |x, y| {
            Rgb([x as f32 / side as f32, y as f32 / side as f32, shade])
        })
    }

    #[test]
    fn every_image_comes_upright_and_turned_with_its_group() {
        let images: Vec<_> = (0..6).map(|i| marked(5, i as f32)).collect();
        let (task, task_images) = rotation(&dataset(6), &images, 7);
        assert_eq!(task.samples.len(), 12);
        assert_eq!(
            (task.classes.negative.as_str(), task.classes.positive.as_str()),
            ROTATION_CLASSES
        );
        let mut turns = std::collections::BTreeSet::new();
        for (i, original) in images.iter().enumerate() {
            let (upright, turned) = (&task.samples[2 * i], &task.samples[2 * i + 1]);
            assert!(!upright.positive && turned.positive);
            assert_eq!((upright.group, turned.group), (i / 2, i / 2));
            assert_eq!(&task_images[2 * i], original);
            let turned_image = &task_images[2 * i + 1];
            let quarter_turns = [
                imageops::rotate90(original),
                imageops::rotate180(original),
                imageops::rotate270(original),
            ]
            .iter()
            .position(|candidate| candidate == turned_image);
            turns.insert(quarter_turns.expect("a quarter, half or three-quarter turn of the image"));
        }
        assert!(turns.len() > 1, "the turns are drawn, not fixed: {turns:?}");
        let (_, again) = rotation(&dataset(6), &images, 7);
        assert_eq!(again, task_images, "the same seed turns the same way");
    }
}
