//! Synthetic, X-ray-like test images whose two classes differ by a real
//! visual pattern, so that tests can train small models without any patient
//! data.
//!
//! Every image shows a dark, slightly noisy background, a broad soft-tissue
//! glow and a long bright bone shaft (brighter cortex at its edges) running
//! roughly vertically through the middle. A *fractured* image additionally has
//! a dark fracture gap (10–14% of the image) crossing the whole width of the
//! shaft, sometimes with the part below it shifted sideways. Global brightness, contrast and noise vary per
//! image so that overall intensity does not reveal the class.
//!
//! The gap is deliberately about as dark as the background, wide, and the
//! shaft stays near the centre: the study's naive CNN only has 1x1
//! convolutions (per-pixel features) followed by 2x2 max-pools and a dense
//! layer. Its ReLU units start with zero bias on non-negative pixels, so in
//! practice they learn brightness detectors, and max-pooling keeps the
//! brightest pixel of each 8x8 cell: a thin dark crack beside bright bone
//! vanishes, while a gap that blanks whole cells along the shaft does not.
//! (Measured: with 3-5% cracks the study's CNN stayed at chance; with this gap
//! it learns.)
//!
//! Rendering is a pure function of `(size, fractured, seed)`. The geometry
//! and noise are drawn identically for both classes, so the two images of
//! one seed differ only by the crack (and the shift of the bone below it).

use image::{GrayImage, ImageError, ImageFormat, Luma};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f32::consts::PI;
use std::io;
use std::path::{Path, PathBuf};

/// Description of one synthetic radiograph; [`SyntheticXray::render`] draws it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyntheticXray {
    /// Width and height in pixels (meant for 32 and above).
    pub size: u32,
    /// Whether the bone shows a fracture line.
    pub fractured: bool,
    /// Seed of every random choice in the image.
    pub seed: u64,
}

impl SyntheticXray {
    /// Renders the image (same as [`render`]).
    pub fn render(&self) -> GrayImage {
        render(self.size, self.fractured, self.seed)
    }
}

/// Renders a `size`×`size` synthetic radiograph; deterministic in its arguments.
pub fn render(size: u32, fractured: bool, seed: u64) -> GrayImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scene = Scene::sample(size, &mut rng);
    let crack = fractured.then_some(&scene.crack);
    GrayImage::from_fn(size, size, |x, y| {
        // Pixel centres, matching the geometry's continuous coordinates.
        let clean = scene.intensity(x as f32 + 0.5, y as f32 + 0.5, crack);
        // Noise is drawn for every pixel whatever the class, so both classes
        // of a seed share it.
        let noisy = clean + scene.noise_sigma * standard_normal(&mut rng);
        let graded = (noisy - 0.5) * scene.contrast + 0.5 + scene.brightness;
        Luma([(graded.clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}

/// File format of the written synthetic images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FileFormat {
    /// 8-bit grey PNG.
    #[default]
    Png,
    /// DICOM Part 10 (see [`encode_dicom`]).
    Dicom,
}

impl FileFormat {
    /// File name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Png => "png",
            FileFormat::Dicom => "dcm",
        }
    }
}

/// Writes `DIR/Fracture/*.png` and `DIR/Normal/*.png`, `per_class` images
/// each; returns the paths written (all fractures first, then the normals).
///
/// Each image gets its own seed derived from `seed`, its class and its index,
/// so the two classes are not pixel-for-pixel pairs.
pub fn write_class_folders(dir: &Path, per_class: usize, size: u32, seed: u64) -> io::Result<Vec<PathBuf>> {
    write_class_folders_as(dir, per_class, size, seed, FileFormat::Png)
}

/// [`write_class_folders`] in the given file format (same images, same
/// names up to the extension).
pub fn write_class_folders_as(
    dir: &Path,
    per_class: usize,
    size: u32,
    seed: u64,
    format: FileFormat,
) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (class_index, (folder, fractured)) in [("Fracture", true), ("Normal", false)].into_iter().enumerate() {
        let class_dir = dir.join(folder);
        std::fs::create_dir_all(&class_dir)?;
        for index in 0..per_class {
            let image_seed = derive_seed(seed, class_index as u64, index as u64);
            let path = class_dir.join(format!("{}_{index:05}.{}", folder.to_lowercase(), format.extension()));
            save(&render(size, fractured, image_seed), &path, format, image_seed)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Writes the MURA layout `DIR/patientNNNNN/studyK_{positive,negative}/imageM.png`:
/// `patients` patients, each with 1 or 2 studies of 1–3 images, the label
/// being chosen per study. Returns `(path, fractured, patient index)` for
/// every image written.
///
/// As in MURA, patient folders, studies and images are numbered from 1
/// (`patient00001/study1_positive/image1.png`); the returned patient index is
/// 0-based, so patient index `i` lives in folder `patient{i+1:05}`.
pub fn write_mura(dir: &Path, patients: usize, size: u32, seed: u64) -> io::Result<Vec<(PathBuf, bool, usize)>> {
    write_mura_as(dir, patients, size, seed, FileFormat::Png)
}

/// [`write_mura`] in the given file format (same layout and images).
pub fn write_mura_as(
    dir: &Path,
    patients: usize,
    size: u32,
    seed: u64,
    format: FileFormat,
) -> io::Result<Vec<(PathBuf, bool, usize)>> {
    // The layout is drawn from its own stream so it does not depend on the
    // image contents.
    let mut layout_rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, u64::MAX, 0));
    let mut written = Vec::new();
    for patient in 0..patients {
        let patient_dir = dir.join(format!("patient{:05}", patient + 1));
        let studies = layout_rng.random_range(1..=2u32);
        for study in 1..=studies {
            let positive = layout_rng.random_bool(0.5);
            let suffix = if positive { "positive" } else { "negative" };
            let study_dir = patient_dir.join(format!("study{study}_{suffix}"));
            std::fs::create_dir_all(&study_dir)?;
            let images = layout_rng.random_range(1..=3u32);
            for image in 1..=images {
                let image_seed = derive_seed(seed, patient as u64, u64::from(study * 16 + image));
                let path = study_dir.join(format!("image{image}.{}", format.extension()));
                save(&render(size, positive, image_seed), &path, format, image_seed)?;
                written.push((path, positive, patient));
            }
        }
    }
    Ok(written)
}

fn save(img: &GrayImage, path: &Path, format: FileFormat, seed: u64) -> io::Result<()> {
    match format {
        FileFormat::Png => save_png(img, path),
        FileFormat::Dicom => std::fs::write(path, encode_dicom(img, seed)?),
    }
}

/// Stored DICOM value of 8-bit grey `v`: 12 bits, as a DR detector's output.
const DICOM_SCALE: u16 = 16;

/// Encodes a grey image as a DICOM Part 10 file, the way radiographs come
/// out of an X-ray system: Digital X-Ray for presentation, 16-bit MONOCHROME2
/// with 12 bits stored and a VOI window, uncompressed Explicit VR Little
/// Endian. `uid_seed` makes the instance UIDs (so the same seed gives the
/// same bytes).
///
/// Stored values are the 8-bit values × 16 (0..=4080), and the window
/// (center 2040.5, width 4081) maps exactly that range linearly onto the
/// display range (PS3.3 C.11.2.1.2.1: `(x - 2040) / 4080`), so a viewer, and
/// `fracture_core::preprocess::decode`, shows the same pixels as the PNG of
/// the image: the two formats are interchangeable for training.
pub fn encode_dicom(img: &GrayImage, uid_seed: u64) -> io::Result<Vec<u8>> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    let (width, height) = img.dimensions();
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{width}x{height} is too large for DICOM"),
        )
    };
    let rows = u16::try_from(height).map_err(|_| too_large())?;
    let columns = u16::try_from(width).map_err(|_| too_large())?;
    // 2.25.<128-bit number> is the UID form that needs no registered root.
    let uid = |kind: u64| {
        let high = u128::from(derive_seed(uid_seed, kind, 1));
        format!("2.25.{}", (high << 64) | u128::from(derive_seed(uid_seed, kind, 2)))
    };
    let pixels: Vec<u16> = img.pixels().map(|p| u16::from(p[0]) * DICOM_SCALE).collect();
    let us = |value: u16| PrimitiveValue::from(value);
    let object = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        ),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, uid(1)),
        DataElement::new(tags::MODALITY, VR::CS, "DX"),
        DataElement::new(
            tags::IMAGE_COMMENTS,
            VR::LT,
            "synthetic X-ray (fracture synth), not patient data",
        ),
        DataElement::new(tags::PATIENT_NAME, VR::PN, "SYNTHETIC^XRAY"),
        DataElement::new(tags::PATIENT_ID, VR::LO, "SYNTHETIC"),
        DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, uid(2)),
        DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, uid(3)),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, us(1)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        DataElement::new(tags::ROWS, VR::US, us(rows)),
        DataElement::new(tags::COLUMNS, VR::US, us(columns)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, us(16)),
        DataElement::new(tags::BITS_STORED, VR::US, us(12)),
        DataElement::new(tags::HIGH_BIT, VR::US, us(11)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)),
        DataElement::new(tags::WINDOW_CENTER, VR::DS, "2040.5"),
        DataElement::new(tags::WINDOW_WIDTH, VR::DS, "4081"),
        DataElement::new(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    let file = object
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(io::Error::other)?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).map_err(io::Error::other)?;
    Ok(bytes)
}

fn save_png(img: &GrayImage, path: &Path) -> io::Result<()> {
    img.save_with_format(path, ImageFormat::Png).map_err(|err| match err {
        ImageError::IoError(io_err) => io_err,
        other => io::Error::other(other),
    })
}

/// Mixes a base seed with two indices (SplitMix64 finaliser) so that nearby
/// indices give unrelated images.
fn derive_seed(base: u64, a: u64, b: u64) -> u64 {
    let mut z = base ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Box–Muller; `rand` 0.9 alone has no normal distribution.
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    let u1: f32 = 1.0 - rng.random::<f32>(); // in (0, 1], keeps ln finite
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// Hermite step from 0 at `edge0` to 1 at `edge1`.
fn smoothstep(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Coverage of a pixel by a band whose edge is `signed_depth` pixels inside
/// it: a one-pixel linear ramp, which anti-aliases the edges.
fn coverage(signed_depth: f32) -> f32 {
    (signed_depth + 0.5).clamp(0.0, 1.0)
}

/// The fracture line; all lengths in pixels.
#[derive(Clone, Debug)]
struct Crack {
    /// Centre of the crack on the bone axis.
    centre: (f32, f32),
    /// Unit normal of the crack line (roughly along the bone).
    normal: (f32, f32),
    /// Unit direction of the crack line (roughly across the bone).
    direction: (f32, f32),
    half_width: f32,
    /// Fraction of the way from bone to background intensity at its core.
    darkness: f32,
    /// `(amplitude, wavelength, phase)` of waves that make the line irregular
    /// instead of ruled: a broad bend, a fine jag, and a variation of width.
    bend: (f32, f32, f32),
    jag: (f32, f32, f32),
    width_wave: (f32, f32, f32),
    /// Sideways shift of the bone below the crack.
    displacement: f32,
}

impl Crack {
    /// Signed distance from the irregular crack centre line (positive below
    /// it) and the local half-width of the crack there.
    fn locate(&self, px: f32, py: f32) -> (f32, f32) {
        let wave = |(amplitude, wavelength, phase): (f32, f32, f32), at: f32| {
            amplitude * (2.0 * PI * at / wavelength + phase).sin()
        };
        let rx = px - self.centre.0;
        let ry = py - self.centre.1;
        let along = rx * self.direction.0 + ry * self.direction.1;
        let across = rx * self.normal.0 + ry * self.normal.1;
        let distance = across - wave(self.bend, along) - wave(self.jag, along);
        let half_width = self.half_width * (1.0 + wave(self.width_wave, along));
        (distance, half_width)
    }
}

/// Every random choice of one image; all lengths in pixels.
#[derive(Clone, Debug)]
struct Scene {
    background: f32,
    /// Large, faint intensity undulations ("film mottle").
    mottle: [(f32, f32, f32, f32); 3],
    tissue_level: f32,
    tissue_centre: (f32, f32),
    tissue_semi_axes: (f32, f32),
    /// A point on the bone axis, at mid-height.
    axis_centre: (f32, f32),
    /// Unit vector along the bone (pointing down) and across it.
    along: (f32, f32),
    across: (f32, f32),
    half_width: f32,
    bone_level: f32,
    cortex_boost: f32,
    medulla_dip: f32,
    crack: Crack,
    noise_sigma: f32,
    contrast: f32,
    brightness: f32,
}

impl Scene {
    /// Draws a scene; always consumes the same random numbers, so the crack
    /// parameters exist (and are unused) for normal images too.
    fn sample<R: Rng + ?Sized>(size: u32, rng: &mut R) -> Scene {
        let s = size as f32;
        let mid = s / 2.0;

        let background = rng.random_range(0.04..0.09);
        let mut mottle = [(0.0, 0.0, 0.0, 0.0); 3];
        for wave in &mut mottle {
            let angle = rng.random_range(0.0..2.0 * PI);
            let wavelength = s * rng.random_range(0.4..1.2);
            let k = 2.0 * PI / wavelength;
            *wave = (
                k * angle.cos(),
                k * angle.sin(),
                rng.random_range(0.0..2.0 * PI),
                rng.random_range(0.005..0.012),
            );
        }

        let tilt = rng.random_range(-15f32..=15.0).to_radians();
        let along = (tilt.sin(), tilt.cos());
        let across = (tilt.cos(), -tilt.sin());
        let axis_centre = (mid + s * rng.random_range(-0.08..=0.08), mid);
        let half_width = s * rng.random_range(0.14..=0.22) / 2.0;

        let tissue_level = rng.random_range(0.30..0.38);
        let tissue_centre = (
            axis_centre.0 + s * rng.random_range(-0.03..=0.03),
            axis_centre.1 + s * rng.random_range(-0.05..=0.05),
        );
        let tissue_semi_axes = (s * rng.random_range(0.33..0.40), s * rng.random_range(0.70..0.85));

        let bone_level = rng.random_range(0.62..0.74);
        let cortex_boost = rng.random_range(0.10..0.16);
        let medulla_dip = rng.random_range(0.03..0.07);

        // The crack sits in the middle 70% of the visible shaft and is tilted
        // up to 30 degrees away from the perpendicular to the bone.
        let offset_along = s * rng.random_range(-0.35..=0.35);
        let crack_angle = rng.random_range(-30f32..=30.0).to_radians();
        let (sin_c, cos_c) = crack_angle.sin_cos();
        let normal = (cos_c * along.0 - sin_c * across.0, cos_c * along.1 - sin_c * across.1);
        let direction = (sin_c * along.0 + cos_c * across.0, sin_c * along.1 + cos_c * across.1);
        let crack = Crack {
            centre: (
                axis_centre.0 + offset_along * along.0,
                axis_centre.1 + offset_along * along.1,
            ),
            normal,
            direction,
            // A gap of 10-14% of the image: wide enough to blank whole cells
            // of the study's CNN after its three 2x2 max-pools (8x8 pixels at
            // 64-150 px), since 1x1 convolutions can only see pixel values
            // and max-pooling hides a thin dark line next to bright bone.
            half_width: (s * rng.random_range(0.10..=0.14) / 2.0).max(1.0),
            darkness: rng.random_range(0.92..=1.0),
            bend: (
                s * rng.random_range(0.004..0.010),
                s * rng.random_range(0.15..0.30),
                rng.random_range(0.0..2.0 * PI),
            ),
            jag: (
                s * rng.random_range(0.001..0.003),
                s * rng.random_range(0.035..0.06),
                rng.random_range(0.0..2.0 * PI),
            ),
            width_wave: (
                rng.random_range(0.1..0.3),
                s * rng.random_range(0.08..0.15),
                rng.random_range(0.0..2.0 * PI),
            ),
            displacement: if rng.random_bool(0.5) {
                s * rng.random_range(-0.03..=0.03)
            } else {
                0.0
            },
        };

        Scene {
            background,
            mottle,
            tissue_level,
            tissue_centre,
            tissue_semi_axes,
            axis_centre,
            along,
            across,
            half_width,
            bone_level,
            cortex_boost,
            medulla_dip,
            crack,
            noise_sigma: rng.random_range(0.012..0.025),
            contrast: rng.random_range(0.9..1.1),
            brightness: rng.random_range(-0.05..0.05),
        }
    }

    /// Noise-free intensity at a point, before global brightness/contrast.
    fn intensity(&self, px: f32, py: f32, crack: Option<&Crack>) -> f32 {
        let mut dark = self.background;
        for &(kx, ky, phase, amplitude) in &self.mottle {
            dark += amplitude * (kx * px + ky * py + phase).sin();
        }

        // Soft tissue: an ellipse aligned with the bone with a wide soft edge.
        let tx = px - self.tissue_centre.0;
        let ty = py - self.tissue_centre.1;
        let u = (tx * self.across.0 + ty * self.across.1) / self.tissue_semi_axes.0;
        let v = (tx * self.along.0 + ty * self.along.1) / self.tissue_semi_axes.1;
        let radius = (u * u + v * v).sqrt();
        let soft = dark + self.tissue_level * (1.0 - smoothstep(0.55, 1.0, radius));

        let rx = px - self.axis_centre.0;
        let ry = py - self.axis_centre.1;
        let mut across = rx * self.across.0 + ry * self.across.1;
        let crack_location = crack.map(|c| c.locate(px, py));
        if let (Some(c), Some((distance, _))) = (crack, crack_location) {
            if distance > 0.0 {
                across -= c.displacement;
            }
        }

        // Shaft profile across the bone: a darker medullary canal in the
        // middle and a brighter cortex towards both edges, as a hollow
        // cylinder projects.
        let q = (across.abs() / self.half_width).min(1.0);
        let bone = self.bone_level - self.medulla_dip * (1.0 - q * q) + self.cortex_boost * smoothstep(0.55, 0.85, q);
        let bone = match (crack, crack_location) {
            (Some(c), Some((distance, half_width))) => {
                let in_crack = coverage(half_width - distance.abs());
                bone + (dark - bone) * c.darkness * in_crack
            }
            _ => bone,
        };
        let in_bone = coverage(self.half_width - across.abs());
        soft + (bone - soft) * in_bone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Darkest value along the bone axis over the middle 70% of the shaft.
    fn min_along_axis(size: u32, fractured: bool, seed: u64) -> f32 {
        let img = render(size, fractured, seed);
        let scene = Scene::sample(size, &mut ChaCha8Rng::seed_from_u64(seed));
        let s = size as f32;
        let at = |t: f32| {
            let x = scene.axis_centre.0 + t * scene.along.0;
            let y = scene.axis_centre.1 + t * scene.along.1;
            let (xi, yi) = (
                x.floor().clamp(0.0, s - 1.0) as u32,
                y.floor().clamp(0.0, s - 1.0) as u32,
            );
            f32::from(img.get_pixel(xi, yi)[0]) / 255.0
        };
        let steps = 400;
        (0..=steps)
            .map(|i| at(-0.37 * s + 0.74 * s * i as f32 / steps as f32))
            .fold(f32::INFINITY, f32::min)
    }

    #[test]
    fn rendering_is_deterministic_for_a_seed() {
        assert_eq!(render(64, true, 9), render(64, true, 9));
        assert_eq!(render(64, false, 9), render(64, false, 9));
        assert_ne!(render(64, true, 9), render(64, true, 10));
        let spec = SyntheticXray {
            size: 48,
            fractured: true,
            seed: 4,
        };
        assert_eq!(spec.render(), render(48, true, 4));
        assert_eq!(spec.render().dimensions(), (48, 48));
    }

    #[test]
    fn a_crack_darkens_the_bone_axis() {
        for seed in 0..40 {
            for size in [32, 64, 150] {
                let normal = min_along_axis(size, false, seed);
                let fractured = min_along_axis(size, true, seed);
                assert!(normal > 0.45, "seed {seed} size {size}: normal axis min {normal}");
                assert!(
                    fractured < normal - 0.3,
                    "seed {seed} size {size}: fractured {fractured} vs normal {normal}"
                );
            }
        }
    }

    #[test]
    fn classes_of_one_seed_differ_only_near_the_crack() {
        let (a, b) = (render(96, false, 5), render(96, true, 5));
        let changed = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
        // A gap 10–14% wide across a bone 14–22% wide (plus a possible shift of
        // the lower part) touches a few percent of the image, never all of it.
        assert!(changed > 20, "only {changed} pixels changed");
        assert!(changed < 96 * 96 / 2, "{changed} pixels changed");
    }

    #[test]
    fn overall_brightness_does_not_give_the_class_away() {
        let mean = |img: &GrayImage| img.pixels().map(|p| f64::from(p[0])).sum::<f64>() / img.len() as f64;
        let means = |fractured| {
            (0..60)
                .map(|seed| mean(&render(64, fractured, 1000 + seed)))
                .collect::<Vec<_>>()
        };
        let (normal, fractured) = (means(false), means(true));
        let ranges = [lo_hi(&normal), lo_hi(&fractured)];
        // The per-image spread of mean brightness is wider than the gap
        // between the classes' averages.
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let gap = (avg(&normal) - avg(&fractured)).abs();
        assert!(ranges[0].1 - ranges[0].0 > 3.0 * gap, "{ranges:?} gap {gap}");
        assert!(ranges[1].1 - ranges[1].0 > 3.0 * gap, "{ranges:?} gap {gap}");
    }

    fn lo_hi(v: &[f64]) -> (f64, f64) {
        (
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(f64::MIN, f64::max),
        )
    }

    #[test]
    fn small_and_degenerate_sizes_do_not_panic() {
        for size in [0, 1, 2, 5, 31, 32, 33] {
            for fractured in [false, true] {
                assert_eq!(render(size, fractured, 1).dimensions(), (size, size));
            }
        }
    }

    #[test]
    fn class_folders_have_the_expected_layout() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let paths = write_class_folders(dir.path(), 3, 40, 11)?;
        assert_eq!(paths.len(), 6);
        let unique: BTreeSet<_> = paths.iter().collect();
        assert_eq!(unique.len(), 6);
        for (i, path) in paths.iter().enumerate() {
            let class = if i < 3 { "Fracture" } else { "Normal" };
            assert_eq!(path.parent(), Some(dir.path().join(class).as_path()));
            assert_eq!(path.extension().and_then(|e| e.to_str()), Some("png"));
            let img = image::open(path).map_err(io::Error::other)?.to_luma8();
            assert_eq!(img.dimensions(), (40, 40));
        }
        for class in ["Fracture", "Normal"] {
            assert_eq!(std::fs::read_dir(dir.path().join(class))?.count(), 3);
        }
        // Same seed, same files.
        let again = tempfile::tempdir()?;
        let paths_again = write_class_folders(again.path(), 3, 40, 11)?;
        for (a, b) in paths.iter().zip(&paths_again) {
            assert_eq!(std::fs::read(a)?, std::fs::read(b)?);
        }
        // Images within a class are not copies of each other.
        assert_ne!(std::fs::read(&paths[0])?, std::fs::read(&paths[1])?);
        Ok(())
    }

    #[test]
    fn mura_layout_and_bookkeeping_match() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let patients = 12;
        let written = write_mura(dir.path(), patients, 36, 3)?;
        let mut seen_patients = BTreeSet::new();
        let mut labels = BTreeSet::new();
        let mut studies_per_patient = vec![BTreeSet::new(); patients];
        for (path, positive, patient) in &written {
            let rel = path.strip_prefix(dir.path()).map_err(io::Error::other)?;
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            assert_eq!(parts.len(), 3, "{rel:?}");
            assert_eq!(parts[0], format!("patient{:05}", patient + 1));
            let (study, label) = parts[1].split_once('_').unwrap_or(("", ""));
            assert!(matches!(study, "study1" | "study2"), "{rel:?}");
            assert_eq!(label, if *positive { "positive" } else { "negative" });
            assert!(matches!(parts[2].as_str(), "image1.png" | "image2.png" | "image3.png"));
            let img = image::open(path).map_err(io::Error::other)?;
            assert_eq!((img.width(), img.height()), (36, 36));
            seen_patients.insert(*patient);
            labels.insert(*positive);
            studies_per_patient[*patient].insert(parts[1].clone());
        }
        assert_eq!(seen_patients, (0..patients).collect());
        assert_eq!(labels.len(), 2, "both labels should occur with 12 patients");
        assert!(studies_per_patient.iter().all(|s| (1..=2).contains(&s.len())));
        // The files on disk are exactly the ones reported.
        let mut on_disk = 0;
        for patient in std::fs::read_dir(dir.path())? {
            for study in std::fs::read_dir(patient?.path())? {
                on_disk += std::fs::read_dir(study?.path())?.count();
            }
        }
        assert_eq!(on_disk, written.len());
        assert_eq!(write_mura(dir.path(), 0, 36, 3)?.len(), 0);
        Ok(())
    }

    #[test]
    fn dicom_files_decode_to_the_same_pixels_as_the_png() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let paths = write_class_folders_as(dir.path(), 2, 40, 11, FileFormat::Dicom)?;
        let pngs = write_class_folders(dir.path(), 2, 40, 11)?;
        assert_eq!(paths.len(), 4);
        for (dcm, png) in paths.iter().zip(&pngs) {
            assert_eq!(dcm.extension().and_then(|e| e.to_str()), Some("dcm"));
            assert_eq!(dcm.with_extension("png"), *png);
            let from_dicom = fracture_core::preprocess::decode(&std::fs::read(dcm)?).map_err(io::Error::other)?;
            let from_png = fracture_core::preprocess::decode(&std::fs::read(png)?).map_err(io::Error::other)?;
            assert_eq!(from_dicom.dimensions(), (40, 40));
            for (a, b) in from_dicom.as_raw().iter().zip(from_png.as_raw()) {
                assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", dcm.display());
            }
        }
        // Deterministic bytes for a seed (UIDs included), distinct UIDs per image.
        assert_eq!(
            encode_dicom(&render(32, true, 3), 3)?,
            encode_dicom(&render(32, true, 3), 3)?
        );
        assert_ne!(
            encode_dicom(&render(32, true, 3), 3)?,
            encode_dicom(&render(32, true, 3), 4)?
        );
        let mura = write_mura_as(dir.path().join("mura").as_path(), 2, 36, 3, FileFormat::Dicom)?;
        assert!(mura
            .iter()
            .all(|(path, _, _)| path.extension().and_then(|e| e.to_str()) == Some("dcm")));
        Ok(())
    }

    /// Not a test: `cargo test -- --ignored save_samples` writes examples to
    /// /tmp/synthetic-samples for eyeballing.
    #[test]
    #[ignore]
    fn save_samples() -> io::Result<()> {
        let dir = Path::new("/tmp/synthetic-samples");
        std::fs::create_dir_all(dir)?;
        let (columns, tile) = (6u32, 150u32);
        // Top row normal, bottom row fractured, same seeds column by column.
        let mut sheet = GrayImage::from_pixel(columns * (tile + 4), 2 * (tile + 4), Luma([255]));
        for seed in 0..columns {
            for (row, fractured) in [(0, false), (1, true)] {
                let img = render(tile, fractured, u64::from(seed));
                let name = format!("seed{seed}_{}.png", if fractured { "fracture" } else { "normal" });
                save_png(&img, &dir.join(name))?;
                let (x, y) = (i64::from(seed * (tile + 4)), i64::from(row * (tile + 4)));
                image::imageops::replace(&mut sheet, &img, x, y);
            }
        }
        save_png(&sheet, &dir.join("sheet.png"))?;
        for size in [32u32, 64] {
            let mut small = GrayImage::from_pixel(columns * (size + 2), 2 * (size + 2), Luma([255]));
            for seed in 0..columns {
                for (row, fractured) in [(0, false), (1, true)] {
                    let (x, y) = (i64::from(seed * (size + 2)), i64::from(row * (size + 2)));
                    image::imageops::replace(&mut small, &render(size, fractured, u64::from(seed)), x, y);
                }
            }
            save_png(&small, &dir.join(format!("sheet{size}.png")))?;
        }
        Ok(())
    }
}
