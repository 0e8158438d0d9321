//! Class activation maps: where the model sees evidence for "abnormal".
//!
//! DenseNet ends in global average pooling and one linear output, so the
//! logit is the spatial mean of `Σ_k w_k A_k` (plus the bias): that map,
//! rectified, shows which regions pushed the prediction up, with no
//! backward pass.

use image::{Rgb32FImage, RgbaImage};
use serde::Serialize;

/// A low-resolution map in [0, 1], row-major, to be stretched over the image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Heatmap {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl Heatmap {
    /// Scales to [0, 1] by the map's maximum; an all-zero map stays zero.
    pub fn normalised(width: usize, height: usize, mut values: Vec<f32>) -> Self {
        let max = values.iter().copied().fold(0f32, f32::max);
        if max > 0.0 && max.is_finite() {
            values.iter_mut().for_each(|v| *v = (*v / max).clamp(0.0, 1.0));
        } else {
            values.iter_mut().for_each(|v| *v = 0.0);
        }
        Self { width, height, values }
    }

    /// Bilinear sample at fractional map coordinates (pixel centres at +0.5).
    fn sample(&self, x: f32, y: f32) -> f32 {
        let fx = (x - 0.5).clamp(0.0, (self.width - 1) as f32);
        let fy = (y - 0.5).clamp(0.0, (self.height - 1) as f32);
        let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
        let at = |x: usize, y: usize| self.values[y * self.width + x];
        let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
        let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
        top * (1.0 - ty) + bottom * ty
    }
}

/// A perceptually ordered ramp (dark blue → red → yellow) for heat.
fn heat_colour(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    [
        (1.5 * v).min(1.0),
        (2.0 * v - 0.8).clamp(0.0, 1.0),
        (0.6 - 1.5 * v).clamp(0.0, 1.0),
    ]
}

/// The image with the heat map blended over it, at the image's own size.
/// Weak activations stay transparent so the anatomy remains readable.
pub fn overlay(image: &Rgb32FImage, heatmap: &Heatmap) -> RgbaImage {
    let (width, height) = image.dimensions();
    RgbaImage::from_fn(width, height, |x, y| {
        let base = image.get_pixel(x, y).0;
        if heatmap.width == 0 || heatmap.height == 0 {
            return image::Rgba([
                (base[0] * 255.0) as u8,
                (base[1] * 255.0) as u8,
                (base[2] * 255.0) as u8,
                255,
            ]);
        }
        let mx = (x as f32 + 0.5) * heatmap.width as f32 / width as f32;
        let my = (y as f32 + 0.5) * heatmap.height as f32 / height as f32;
        let heat = heatmap.sample(mx, my);
        let alpha = 0.6 * heat;
        let colour = heat_colour(heat);
        let mix = |c: usize| ((base[c] * (1.0 - alpha) + colour[c] * alpha).clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgba([mix(0), mix(1), mix(2), 255])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_and_overlay_put_heat_where_the_map_is_high() {
        let map = Heatmap::normalised(2, 1, vec![0.0, 4.0]);
        assert_eq!(map.values, vec![0.0, 1.0]);
        let grey = Rgb32FImage::from_pixel(8, 4, image::Rgb([0.5, 0.5, 0.5]));
        let out = overlay(&grey, &map);
        assert_eq!(out.dimensions(), (8, 4));
        // Left edge untouched grey, right edge tinted red.
        assert_eq!(out.get_pixel(0, 2).0, [128, 128, 128, 255]);
        let right = out.get_pixel(7, 2).0;
        assert!(right[0] > 180 && right[2] < 100, "{right:?}");
        assert_eq!(Heatmap::normalised(1, 1, vec![f32::NAN]).values, vec![0.0]);
    }
}
