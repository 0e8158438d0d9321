//! Training-time image augmentation that reproduces the study's Keras
//! preprocessing stack:
//!
//! ```python
//! RandomFlip("horizontal"), RandomRotation(0.1), RandomZoom(0.2), RandomBrightness(0.4)
//! ```
//!
//! Images are [`Rgb32FImage`]s on the `0..=1` scale, which plays the role of
//! Keras' default `0..255` value range (so a Keras brightness delta of
//! `0.4 * 255` is `0.4` here).
//!
//! # Keras semantics reproduced
//!
//! * **Flip** (`RandomFlip("horizontal")`): with probability 0.5 the image is
//!   mirrored left-right.
//! * **Rotation** (`RandomRotation(f)`): an angle is drawn uniformly from
//!   `[-f·2π, f·2π]` (`f = 0.1` → ±36°) and the image is rotated about its
//!   centre `((W-1)/2, (H-1)/2)`. As in TF/Keras the transform is
//!   specified as the map from an *output* pixel to the *input* position it
//!   samples, `in = c + R(θ)·(out - c)` with `R(θ) = [[cos, -sin], [sin, cos]]`
//!   in `(x right, y down)` pixel coordinates; a positive angle therefore turns
//!   the picture counter-clockwise on screen, which is what Keras documents.
//!   This is the matrix of Keras 3's `RandomRotation` (and of tf.keras 2).
//!   (Later Keras 3 releases build it through an OpenCV-style matrix centred
//!   at `W/2` with the opposite sign; as the angle distribution is symmetric,
//!   the augmentation distribution is the same up to half a pixel.)
//! * **Zoom** (`RandomZoom(z)`, `width_factor=None`): one scale
//!   `s = 1 + U(-z, z)` is used for both axes (aspect ratio kept) and
//!   `in = c + s·(out - c)`. Hence, following Keras' sign convention, a
//!   *positive* factor (`s > 1`) zooms **out** (the content shrinks and the
//!   border is filled) and a negative one (`s < 1`) zooms **in**.
//! * **Brightness** (`RandomBrightness(b)`): a single delta `U(-b, b)` is added
//!   to every pixel and channel, then the result is clipped to `[0, 1]`.
//!
//! Two transforms are not in the study's stack (its presets leave them off):
//!
//! * **Translation** `t`: the picture moves by `U(-t, t)` of its width and,
//!   drawn separately, of its height, in the zoom's resampling pass
//!   (`in = c + s·(out - c) - shift`), so it costs no pass of its own.
//! * **Contrast** `k`: after brightness every value `v` becomes `v^γ` with
//!   `γ = exp(U(-k, k))`. X-rays differ in exposure and windowing by a curve
//!   more than by an offset; a power keeps black black and white white.
//!
//! Rotation and zoom use bilinear sampling and `fill_mode="reflect"`, which in
//! TF's `ImageProjectiveTransformV3` kernel (`MapCoordinate<FILL_REFLECT>`) is
//! `(d c b a | a b c d | d c b a)`: the continuous sample coordinate is
//! reflected about the outer *edge* of the border pixel (so the border pixel
//! is repeated once), periodically with period `2·len`, then clamped to
//! `[0, len-1]` before bilinear interpolation. [`reflect_coordinate`]
//! implements exactly that mapping.
//!
//! The layers are applied in Keras' order – flip, rotation, zoom, brightness –
//! and, like Keras, rotation and zoom are two separate resampling passes: the
//! zoom pass reflects the already-rotated image, so the filled border matches
//! what the study's model saw (a single fused pass would reflect the original
//! image instead and differ near the borders).
//!
//! # Random number order
//!
//! [`Augmentation::sample`] draws from the RNG only for enabled transforms, in
//! this order: flip (one `bool`), rotation angle, zoom scale, brightness delta,
//! horizontal and vertical shift, gamma: the study's presets draw what they
//! always drew.
//! A seeded RNG therefore reproduces the same output for the same
//! `Augmentation`, but changing which transforms are enabled changes the
//! values drawn for the later ones.

use image::{imageops, Rgb, Rgb32FImage};
use rand::Rng;
use std::f32::consts::PI;

/// Strength of each augmentation layer, using the same factors as the Keras
/// constructors (see the module documentation for their meaning).
///
/// Factors are interpreted like Keras does: the sign is ignored and the
/// magnitude is limited to `1.0` (Keras rejects larger values; here they are
/// clamped so a bad configuration cannot panic). Non-finite factors disable
/// the transform.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augmentation {
    /// Mirror left-right with probability 0.5 (`RandomFlip("horizontal")`).
    pub flip_horizontal: bool,
    /// `RandomRotation` factor, a fraction of a full turn.
    pub rotation: f32,
    /// `RandomZoom` height factor (width follows it, keeping the aspect ratio).
    pub zoom: f32,
    /// `RandomBrightness` factor, a fraction of the value range.
    pub brightness: f32,
    /// Largest shift, a fraction of the width and of the height.
    // Left out when off, so that the study's and the mild stack's schedules
    // serialise, and so fingerprint, as before (interrupted runs resume).
    #[serde(default, skip_serializing_if = "is_off")]
    pub translation: f32,
    /// Largest |ln γ| of the gamma curve applied after brightness.
    #[serde(default, skip_serializing_if = "is_off")]
    pub contrast: f32,
}

fn is_off(factor: &f32) -> bool {
    *factor == 0.0
}

/// One concrete draw of the augmentation parameters, applied
/// deterministically by [`AugmentParams::apply`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentParams {
    /// Mirror left-right.
    pub flip: bool,
    /// Rotation angle in radians; positive turns the picture counter-clockwise.
    pub angle_radians: f32,
    /// Keras' zoom scale `1 + factor`: `> 1` zooms out, `< 1` zooms in.
    pub zoom_scale: f32,
    /// Brightness delta on the `0..=1` scale; `None` when the brightness layer
    /// is absent, in which case no clipping happens either.
    pub brightness_delta: Option<f32>,
    /// Shift of the picture, in fractions of its width and height (positive:
    /// right and down).
    pub shift: [f32; 2],
    /// Exponent applied to every value after brightness (1: unchanged).
    pub gamma: f32,
}

impl AugmentParams {
    /// Parameters that leave every image unchanged.
    pub const IDENTITY: AugmentParams = AugmentParams {
        flip: false,
        angle_radians: 0.0,
        zoom_scale: 1.0,
        brightness_delta: None,
        shift: [0.0, 0.0],
        gamma: 1.0,
    };

    /// Applies flip, rotation, zoom (with the shift) and brightness, in
    /// Keras' order, then the gamma curve.
    pub fn apply(&self, img: &Rgb32FImage) -> Rgb32FImage {
        let mut out = if self.flip {
            imageops::flip_horizontal(img)
        } else {
            img.clone()
        };
        if self.angle_radians != 0.0 || self.zoom_scale != 1.0 || self.shift != [0.0, 0.0] {
            out = rotate_zoom_shift(&out, self.angle_radians, self.zoom_scale, self.shift);
        }
        if let Some(delta) = self.brightness_delta {
            adjust_brightness(&mut out, delta);
        }
        if self.gamma.is_finite() && self.gamma > 0.0 && self.gamma != 1.0 {
            for value in out.iter_mut() {
                *value = value.clamp(0.0, 1.0).powf(self.gamma);
            }
        }
        out
    }
}

impl Augmentation {
    /// The study's stack: `RandomFlip("horizontal")`, `RandomRotation(0.1)`,
    /// `RandomZoom(0.2)`, `RandomBrightness(0.4)`.
    pub const STUDY: Augmentation = Augmentation {
        flip_horizontal: true,
        rotation: 0.1,
        zoom: 0.2,
        brightness: 0.4,
        translation: 0.0,
        contrast: 0.0,
    };

    /// Half the study's geometry and a quarter of its brightness: X-rays vary
    /// little in exposure after the scanner's windowing, and ±0.4 of the range
    /// can wash a thin fracture line out.
    pub const MILD: Augmentation = Augmentation {
        flip_horizontal: true,
        rotation: 0.05,
        zoom: 0.1,
        brightness: 0.1,
        translation: 0.0,
        contrast: 0.0,
    };

    /// The mild stack's rotation and brightness with the study's zoom, shifts
    /// of up to a tenth and a gamma between 0.74 and 1.35: MURA's pictures
    /// differ in framing and exposure far more than the mild stack draws,
    /// and the scratch recipe overfits when trained for longer.
    pub const STRONG: Augmentation = Augmentation {
        flip_horizontal: true,
        rotation: 0.05,
        zoom: 0.2,
        brightness: 0.1,
        translation: 0.1,
        contrast: 0.3,
    };

    /// No augmentation at all.
    pub const NONE: Augmentation = Augmentation {
        flip_horizontal: false,
        rotation: 0.0,
        zoom: 0.0,
        brightness: 0.0,
        translation: 0.0,
        contrast: 0.0,
    };

    /// True when [`Augmentation::apply`] returns its input unchanged.
    pub fn is_identity(&self) -> bool {
        !self.flip_horizontal
            && sanitize_factor(self.rotation) == 0.0
            && sanitize_factor(self.zoom) == 0.0
            && sanitize_factor(self.brightness) == 0.0
            && sanitize_factor(self.translation) == 0.0
            && sanitize_factor(self.contrast) == 0.0
    }

    /// Draws one set of parameters (see the module docs for the draw order).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> AugmentParams {
        let mut params = AugmentParams::IDENTITY;
        if self.flip_horizontal {
            params.flip = rng.random_bool(0.5);
        }
        let rotation = sanitize_factor(self.rotation);
        if rotation > 0.0 {
            params.angle_radians = rng.random_range(-rotation..=rotation) * 2.0 * PI;
        }
        let zoom = sanitize_factor(self.zoom);
        if zoom > 0.0 {
            params.zoom_scale = 1.0 + rng.random_range(-zoom..=zoom);
        }
        let brightness = sanitize_factor(self.brightness);
        if brightness > 0.0 {
            params.brightness_delta = Some(rng.random_range(-brightness..=brightness));
        }
        let translation = sanitize_factor(self.translation);
        if translation > 0.0 {
            params.shift = [
                rng.random_range(-translation..=translation),
                rng.random_range(-translation..=translation),
            ];
        }
        let contrast = sanitize_factor(self.contrast);
        if contrast > 0.0 {
            params.gamma = rng.random_range(-contrast..=contrast).exp();
        }
        params
    }

    /// Draws parameters from `rng` and applies them to `img`.
    pub fn apply<R: Rng + ?Sized>(&self, img: &Rgb32FImage, rng: &mut R) -> Rgb32FImage {
        self.sample(rng).apply(img)
    }
}

/// Keras accepts `|factor| <= 1` and ignores the sign of a scalar factor.
fn sanitize_factor(factor: f32) -> f32 {
    if factor.is_finite() {
        factor.abs().min(1.0)
    } else {
        0.0
    }
}

/// Deterministic rotation followed by zoom, exactly as Keras'
/// `RandomRotation` then `RandomZoom` would transform the image for a drawn
/// `angle_radians` (positive = counter-clockwise on screen) and zoom scale
/// `zoom` (Keras' `1 + factor`: `2.0` halves the content, `0.5` doubles it).
///
/// Each step is its own bilinear, reflect-filled resampling, as in Keras; a
/// step whose parameter is the identity (or not finite) is skipped. The output
/// has the input's dimensions.
pub fn rotate_zoom(img: &Rgb32FImage, angle_radians: f32, zoom: f32) -> Rgb32FImage {
    rotate_zoom_shift(img, angle_radians, zoom, [0.0, 0.0])
}

/// [`rotate_zoom`], the zoom pass also moving the picture by `shift` (fractions
/// of the width and height; positive: right and down).
pub fn rotate_zoom_shift(img: &Rgb32FImage, angle_radians: f32, zoom: f32, shift: [f32; 2]) -> Rgb32FImage {
    let mut out = img.clone();
    if angle_radians.is_finite() && angle_radians != 0.0 {
        let (sin, cos) = angle_radians.sin_cos();
        out = resample_about_centre(&out, [[cos, -sin], [sin, cos]], [0.0, 0.0]);
    }
    let zoom = if zoom.is_finite() { zoom } else { 1.0 };
    let shift = shift.map(|s| if s.is_finite() { s } else { 0.0 });
    if zoom != 1.0 || shift != [0.0, 0.0] {
        let (width, height) = out.dimensions();
        let offset = [shift[0] * width as f32, shift[1] * height as f32];
        out = resample_about_centre(&out, [[zoom, 0.0], [0.0, zoom]], offset);
    }
    out
}

/// Adds `delta` to every channel and clips to `[0, 1]` (`RandomBrightness`).
fn adjust_brightness(img: &mut Rgb32FImage, delta: f32) {
    for value in img.iter_mut() {
        *value = (*value + delta).clamp(0.0, 1.0);
    }
}

/// Resamples `img` so that output pixel `out` takes the bilinear, reflect-filled
/// value at input position `c + m·(out - c) - offset`, `c` being the image
/// centre (so the picture moves by `offset` pixels).
fn resample_about_centre(img: &Rgb32FImage, m: [[f32; 2]; 2], offset: [f32; 2]) -> Rgb32FImage {
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 {
        return img.clone();
    }
    let cx = (width as f32 - 1.0) / 2.0;
    let cy = (height as f32 - 1.0) / 2.0;
    Rgb32FImage::from_fn(width, height, |x, y| {
        let dx = x as f32 - cx;
        let dy = y as f32 - cy;
        let src_x = reflect_coordinate(cx + m[0][0] * dx + m[0][1] * dy - offset[0], width);
        let src_y = reflect_coordinate(cy + m[1][0] * dx + m[1][1] * dy - offset[1], height);
        Rgb(bilinear(img, src_x, src_y))
    })
}

/// TF's `fill_mode="reflect"` coordinate map (`MapCoordinate<FILL_REFLECT>`):
/// reflects about the outer edge of the border pixels (`-0.5` and
/// `len - 0.5`), i.e. `x ↦ -1 - x` below zero and `x ↦ 2·len - 1 - x` above,
/// periodically with period `2·len`, then clamps to `[0, len-1]` so bilinear
/// interpolation never reads outside the image. A one-pixel axis maps to 0.
pub fn reflect_coordinate(coord: f32, len: u32) -> f32 {
    if len <= 1 || !coord.is_finite() {
        return 0.0;
    }
    let len = len as f32;
    let period = 2.0 * len;
    let mut folded = coord.rem_euclid(period);
    if folded >= len {
        folded = period - 1.0 - folded;
    }
    folded.clamp(0.0, len - 1.0)
}

/// Bilinear interpolation at an in-range position (`0 <= x <= w-1`, same for y).
fn bilinear(img: &Rgb32FImage, x: f32, y: f32) -> [f32; 3] {
    let (width, height) = img.dimensions();
    let x0 = (x.floor() as u32).min(width - 1);
    let y0 = (y.floor() as u32).min(height - 1);
    let x1 = (x0 + 1).min(width - 1);
    let y1 = (y0 + 1).min(height - 1);
    let fx = x - x0 as f32;
    let fy = y - y0 as f32;
    let p00 = img.get_pixel(x0, y0).0;
    let p10 = img.get_pixel(x1, y0).0;
    let p01 = img.get_pixel(x0, y1).0;
    let p11 = img.get_pixel(x1, y1).0;
    let mut out = [0.0; 3];
    for (c, value) in out.iter_mut().enumerate() {
        let top = p00[c] + (p10[c] - p00[c]) * fx;
        let bottom = p01[c] + (p11[c] - p01[c]) * fx;
        *value = top + (bottom - top) * fy;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A deterministic image in which every pixel differs and no mirror or
    /// rotation maps it onto itself.
    fn asymmetric(width: u32, height: u32) -> Rgb32FImage {
        Rgb32FImage::from_fn(width, height, |x, y| {
            let v = (x * 7 + y * 13) as f32 / (width * 7 + height * 13) as f32;
            Rgb([v, 1.0 - v, (x as f32 + 0.5) / width as f32])
        })
    }

    fn grey(width: u32, height: u32, value: f32) -> Rgb32FImage {
        Rgb32FImage::from_pixel(width, height, Rgb([value; 3]))
    }

    fn max_abs_diff(a: &Rgb32FImage, b: &Rgb32FImage) -> f32 {
        a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
    }

    fn mean(img: &Rgb32FImage) -> f32 {
        img.iter().sum::<f32>() / img.len() as f32
    }

    /// Black image with a white `side`×`side` square in the middle.
    fn centred_square(size: u32, side: u32) -> Rgb32FImage {
        let lo = (size - side) / 2;
        Rgb32FImage::from_fn(size, size, |x, y| {
            let inside = (lo..lo + side).contains(&x) && (lo..lo + side).contains(&y);
            Rgb([if inside { 1.0 } else { 0.0 }; 3])
        })
    }

    /// Width of the bright region along the middle row.
    fn bright_run_on_middle_row(img: &Rgb32FImage) -> usize {
        let y = img.height() / 2;
        (0..img.width()).filter(|&x| img.get_pixel(x, y)[0] > 0.5).count()
    }

    #[test]
    fn factor_constants_match_the_study() {
        let study = Augmentation::STUDY;
        assert!(study.flip_horizontal);
        assert_eq!((study.rotation, study.zoom, study.brightness), (0.1, 0.2, 0.4));
        assert!(Augmentation::NONE.is_identity());
        assert!(!Augmentation::STUDY.is_identity());
        let nan = Augmentation {
            rotation: f32::NAN,
            ..Augmentation::NONE
        };
        assert!(nan.is_identity());
    }

    #[test]
    fn none_is_exactly_the_identity_and_draws_nothing() {
        let img = asymmetric(17, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let out = Augmentation::NONE.apply(&img, &mut rng);
        assert_eq!(out, img);
        let mut fresh = ChaCha8Rng::seed_from_u64(3);
        assert_eq!(rng.random::<u64>(), fresh.random::<u64>());
    }

    #[test]
    fn flip_mirrors_exactly() {
        let img = asymmetric(9, 5);
        let params = AugmentParams {
            flip: true,
            ..AugmentParams::IDENTITY
        };
        let out = params.apply(&img);
        for (x, y, pixel) in out.enumerate_pixels() {
            assert_eq!(*pixel, *img.get_pixel(8 - x, y));
        }
        assert_ne!(out, img);
    }

    #[test]
    fn random_flip_flips_about_half_the_time() {
        let img = asymmetric(6, 4);
        let mirrored = imageops::flip_horizontal(&img);
        let flip_only = Augmentation {
            flip_horizontal: true,
            ..Augmentation::NONE
        };
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let mut flipped = 0;
        for _ in 0..1000 {
            let out = flip_only.apply(&img, &mut rng);
            if out == mirrored {
                flipped += 1;
            } else {
                assert_eq!(out, img, "a flip-only draw must be the image or its mirror");
            }
        }
        assert!((430..=570).contains(&flipped), "flipped {flipped} of 1000");
    }

    #[test]
    fn rotating_90_degrees_moves_a_corner_marker_counter_clockwise() {
        let size = 9;
        let mut img = grey(size, size, 0.0);
        img.put_pixel(0, 0, Rgb([1.0, 0.5, 0.25]));
        let out = rotate_zoom(&img, PI / 2.0, 1.0);
        // Counter-clockwise on screen: the top-left corner goes to bottom-left.
        let moved = out.get_pixel(0, size - 1);
        for (got, want) in moved.0.iter().zip([1.0, 0.5, 0.25]) {
            assert!((got - want).abs() < 1e-4, "marker {moved:?}");
        }
        let elsewhere: f32 = out.iter().sum::<f32>() - moved.0.iter().sum::<f32>();
        assert!(elsewhere.abs() < 1e-3, "marker smeared elsewhere: {elsewhere}");

        let back = rotate_zoom(&img, -PI / 2.0, 1.0);
        assert!((back.get_pixel(size - 1, 0)[0] - 1.0).abs() < 1e-4);
    }

    #[test]
    fn rotation_is_about_the_centre_of_non_square_images() {
        // A marker at the exact centre of an odd-sized image stays put.
        let mut img = grey(15, 9, 0.0);
        img.put_pixel(7, 4, Rgb([1.0; 3]));
        let out = rotate_zoom(&img, 0.3, 1.0);
        assert!((out.get_pixel(7, 4)[0] - 1.0).abs() < 1e-5);
        assert_eq!(out.dimensions(), (15, 9));
    }

    #[test]
    fn reflect_fill_leaves_no_black_border_after_rotation() {
        // Bright everywhere, brightest at the edges: constant (zero) fill would
        // leave black corners, reflection only reuses these values.
        let img = Rgb32FImage::from_fn(40, 30, |x, y| {
            let edge = x.min(39 - x).min(y).min(29 - y) as f32;
            Rgb([1.0 - 0.02 * edge; 3])
        });
        let lowest = img.iter().copied().fold(f32::INFINITY, f32::min);
        let out = rotate_zoom(&img, 36f32.to_radians(), 1.2);
        let out_lowest = out.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(out_lowest >= lowest - 1e-5, "{out_lowest} < {lowest}");
    }

    #[test]
    fn reflect_coordinate_matches_tf_definition() {
        // (d c b a | a b c d | d c b a) for len = 4.
        let cases = [
            (-1.0, 0.0),
            (-2.0, 1.0),
            (-4.0, 3.0),
            (-5.0, 3.0),
            (-0.25, 0.0),
            (1.5, 1.5),
            (4.0, 3.0),
            (5.0, 2.0),
            (7.0, 0.0),
            (8.0, 0.0),
            (9.0, 1.0),
            (3.5, 3.0),
        ];
        for (input, expected) in cases {
            assert_eq!(reflect_coordinate(input, 4), expected, "coord {input}");
        }
        assert_eq!(reflect_coordinate(-3.0, 1), 0.0);
        assert_eq!(reflect_coordinate(f32::NAN, 5), 0.0);
    }

    #[test]
    fn zoom_scale_below_one_zooms_in_and_above_one_zooms_out() {
        let img = centred_square(41, 11);
        assert_eq!(bright_run_on_middle_row(&img), 11);
        // Keras factor -0.5 → scale 0.5 → content twice as large.
        let zoomed_in = rotate_zoom(&img, 0.0, 0.5);
        let run = bright_run_on_middle_row(&zoomed_in);
        assert!((21..=23).contains(&run), "zoom in: {run}");
        // Keras factor +0.5 → scale 1.5 → content two thirds as large.
        let zoomed_out = rotate_zoom(&img, 0.0, 1.5);
        let run = bright_run_on_middle_row(&zoomed_out);
        assert!((6..=8).contains(&run), "zoom out: {run}");
        // The square stays centred.
        assert_eq!(zoomed_in.get_pixel(20, 20)[0], 1.0);
        assert_eq!(zoomed_out.get_pixel(20, 20)[0], 1.0);
    }

    #[test]
    fn zoom_out_fills_the_border_by_reflection() {
        // Left half dark, right half bright: reflection keeps each side's
        // colour at its border, unlike wrap (which would swap them).
        let img = Rgb32FImage::from_fn(20, 20, |x, _| Rgb([if x < 10 { 0.1 } else { 0.9 }; 3]));
        let out = rotate_zoom(&img, 0.0, 1.8);
        assert!((out.get_pixel(0, 10)[0] - 0.1).abs() < 1e-6);
        assert!((out.get_pixel(19, 10)[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn sampled_parameters_stay_within_keras_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let limit = 36f32.to_radians();
        let (mut max_angle, mut min_zoom, mut max_zoom) = (0f32, f32::MAX, f32::MIN);
        let (mut min_delta, mut max_delta) = (f32::MAX, f32::MIN);
        for _ in 0..10_000 {
            let p = Augmentation::STUDY.sample(&mut rng);
            assert!(p.angle_radians.abs() <= limit + 1e-6, "angle {}", p.angle_radians);
            assert!((0.8..=1.2).contains(&p.zoom_scale), "zoom {}", p.zoom_scale);
            let delta = p.brightness_delta.unwrap_or(f32::NAN);
            assert!((-0.4..=0.4).contains(&delta), "delta {delta}");
            max_angle = max_angle.max(p.angle_radians.abs());
            min_zoom = min_zoom.min(p.zoom_scale);
            max_zoom = max_zoom.max(p.zoom_scale);
            min_delta = min_delta.min(delta);
            max_delta = max_delta.max(delta);
        }
        // The draws cover the whole range, not a narrower one.
        assert!(max_angle > 35f32.to_radians());
        assert!(min_zoom < 0.81 && max_zoom > 1.19);
        assert!(min_delta < -0.39 && max_delta > 0.39);
    }

    #[test]
    fn the_strong_stack_draws_shifts_and_gammas_over_their_whole_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (mut shifts, mut gammas) = (Vec::new(), Vec::new());
        for _ in 0..10_000 {
            let p = Augmentation::STRONG.sample(&mut rng);
            shifts.extend(p.shift);
            gammas.push(p.gamma);
        }
        let range = |v: &[f32]| {
            v.iter()
                .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
        };
        let (lo, hi) = range(&shifts);
        assert!(
            (-0.1..-0.099).contains(&lo) && hi <= 0.1 && hi > 0.099,
            "shift {lo}..{hi}"
        );
        let (lo, hi) = range(&gammas);
        assert!(lo >= (-0.3f32).exp() - 1e-6 && lo < 0.75, "gamma from {lo}");
        assert!(hi <= 0.3f32.exp() + 1e-6 && hi > 1.34, "gamma to {hi}");
        // The study's presets draw neither, so their seeded draws are unchanged.
        for preset in [Augmentation::STUDY, Augmentation::MILD] {
            let p = preset.sample(&mut rng);
            assert_eq!((p.shift, p.gamma), ([0.0, 0.0], 1.0));
        }
    }

    #[test]
    fn a_shift_moves_the_picture_by_that_fraction() {
        let marker = |x, y| Rgb32FImage::from_fn(16, 8, move |i, j| Rgb([if (i, j) == (x, y) { 1.0 } else { 0.0 }; 3]));
        let shifted = AugmentParams {
            shift: [0.25, -0.25],
            ..AugmentParams::IDENTITY
        }
        .apply(&marker(5, 4));
        // A quarter of 16 to the right, a quarter of 8 up.
        assert!(max_abs_diff(&shifted, &marker(9, 2)) < 1e-6);
    }

    #[test]
    fn gamma_bends_the_grey_curve_and_keeps_its_ends() {
        let img = Rgb32FImage::from_fn(3, 1, |x, _| Rgb([[0.0, 0.25, 1.0][x as usize]; 3]));
        let darker = AugmentParams {
            gamma: 2.0,
            ..AugmentParams::IDENTITY
        }
        .apply(&img);
        let values: Vec<f32> = (0..3).map(|x| darker.get_pixel(x, 0)[0]).collect();
        assert_eq!(values, [0.0, 0.0625, 1.0]);
    }

    #[test]
    fn brightness_shifts_the_mean_by_the_drawn_delta() {
        let brightness_only = Augmentation {
            brightness: 0.4,
            ..Augmentation::NONE
        };
        let img = Rgb32FImage::from_fn(8, 8, |x, y| Rgb([0.4 + 0.02 * (x + y) as f32 / 14.0; 3]));
        for seed in 0..20 {
            let params = brightness_only.sample(&mut ChaCha8Rng::seed_from_u64(seed));
            let delta = params.brightness_delta.unwrap_or(f32::NAN);
            let out = brightness_only.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
            // Values stay inside [0, 1] here, so the shift is exact.
            assert!((mean(&out) - mean(&img) - delta).abs() < 1e-5, "seed {seed}");
        }
    }

    #[test]
    fn brightness_clips_to_the_value_range() {
        let img = Rgb32FImage::from_fn(2, 1, |x, _| Rgb([if x == 0 { 0.1 } else { 0.9 }; 3]));
        let brighter = AugmentParams {
            brightness_delta: Some(0.4),
            ..AugmentParams::IDENTITY
        };
        let out = brighter.apply(&img);
        assert!((out.get_pixel(0, 0)[0] - 0.5).abs() < 1e-6);
        assert_eq!(out.get_pixel(1, 0)[0], 1.0);
        let darker = AugmentParams {
            brightness_delta: Some(-0.4),
            ..AugmentParams::IDENTITY
        };
        let out = darker.apply(&img);
        assert_eq!(out.get_pixel(0, 0)[0], 0.0);
        assert!((out.get_pixel(1, 0)[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn same_seed_reproduces_and_different_seeds_differ() {
        let img = asymmetric(30, 20);
        let run = |seed| Augmentation::STUDY.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(run(1), run(1));
        assert!(max_abs_diff(&run(1), &run(2)) > 0.01);
    }

    #[test]
    fn tiny_and_empty_images_do_not_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (w, h) in [(1, 1), (1, 7), (7, 1), (2, 3), (0, 0), (0, 5)] {
            let img = asymmetric(w.max(1), h.max(1));
            let img = if w == 0 { Rgb32FImage::new(w, h) } else { img };
            for _ in 0..20 {
                let out = Augmentation::STUDY.apply(&img, &mut rng);
                assert_eq!(out.dimensions(), img.dimensions());
                assert!(out.iter().all(|v| v.is_finite()));
            }
        }
        let one = grey(1, 1, 0.3);
        assert_eq!(rotate_zoom(&one, 1.0, 0.7), one);
        // Extreme and invalid parameters are tolerated too.
        let img = asymmetric(5, 4);
        for (angle, zoom) in [(f32::NAN, 1.0), (1.0, f32::INFINITY), (100.0, 0.0), (-3.0, 2.0)] {
            assert!(rotate_zoom(&img, angle, zoom).iter().all(|v| v.is_finite()));
        }
        let wild = Augmentation {
            flip_horizontal: true,
            rotation: -7.0,
            zoom: 3.0,
            brightness: f32::NAN,
            translation: 5.0,
            contrast: f32::INFINITY,
        };
        assert!(wild.apply(&img, &mut rng).iter().all(|v| v.is_finite()));
        let steep = Augmentation { contrast: -9.0, ..wild };
        assert!(steep.apply(&img, &mut rng).iter().all(|v| v.is_finite()));
    }
}
