//! The one path from file bytes to the model's input, used by training,
//! native detection and the browser alike:
//! [`decode`] → [`resize`] → (augmentation, in training only) → [`to_tensor`].

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, ImageReader, Rgb32FImage};

use crate::card::Preprocessing;
use crate::{Error, Result};

/// Decodes PNG, JPEG, BMP or TIFF (8 or 16 bit, grey, RGB or RGBA) or DICOM
/// into RGB on the 0..=1 scale. Grey is repeated over three channels (what
/// Keras' `color_mode="rgb"` does) and alpha is dropped. DICOM is windowed
/// as a viewer would show it (see [`crate::dicom`]).
pub fn decode(bytes: &[u8]) -> Result<Rgb32FImage> {
    // By content, not by name: the `image` crate does not know DICOM, and a
    // Part 10 file's own signature is unambiguous.
    if crate::dicom::is_dicom(bytes) {
        return crate::dicom::decode(bytes);
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Error::UnsupportedImage(
            "unrecognised format (expected PNG, JPEG, BMP, TIFF or DICOM)".into(),
        ));
    }
    let image = reader.decode().map_err(|e| Error::Decode(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::Decode("image has no pixels".into()));
    }
    // to_rgb32f scales 8- and 16-bit samples alike to 0..=1.
    Ok(image.to_rgb32f())
}

/// Bilinear resize to `size`×`size` without keeping the aspect ratio, as
/// Keras' `image_dataset_from_directory(image_size=...)`. The triangle
/// filter widens with the scale factor, so downsizing does not alias.
pub fn resize(image: &Rgb32FImage, size: usize) -> Rgb32FImage {
    let size = size as u32;
    if image.width() == size && image.height() == size {
        return image.clone();
    }
    image::imageops::resize(image, size, size, FilterType::Triangle)
}

/// Decode and resize: what every consumer caches or feeds on.
pub fn load(bytes: &[u8], preprocessing: &Preprocessing) -> Result<Rgb32FImage> {
    Ok(resize(&decode(bytes)?, preprocessing.input_size))
}

/// Stacks images (already at the input size) into a normalised
/// `(batch, 3, size, size)` f32 tensor: `(pixel/255 - mean) / std` per channel.
pub fn to_tensor(images: &[&Rgb32FImage], preprocessing: &Preprocessing, device: &Device) -> Result<Tensor> {
    let size = preprocessing.input_size;
    let plane = size * size;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (index, image) in images.iter().enumerate() {
        if image.width() as usize != size || image.height() as usize != size {
            return Err(Error::Decode(format!(
                "image is {}x{}, expected {size}x{size} after resizing",
                image.width(),
                image.height()
            )));
        }
        let out = &mut data[index * 3 * plane..(index + 1) * 3 * plane];
        for (pixel_index, pixel) in image.pixels().enumerate() {
            for channel in 0..3 {
                out[channel * plane + pixel_index] =
                    (pixel.0[channel] - preprocessing.mean[channel]) / preprocessing.std[channel];
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn every_supported_format_and_depth_decodes_to_the_same_rgb() {
        let grey8 = ImageBuffer::from_fn(4, 3, |x, y| Luma([(x * 60 + y * 5) as u8]));
        let expected: Vec<f32> = grey8.pixels().flat_map(|p| [p.0[0] as f32 / 255.0; 3]).collect();
        let grey16 = ImageBuffer::from_fn(4, 3, |x, y| Luma([((x * 60 + y * 5) * 257) as u16]));
        let rgb = ImageBuffer::from_fn(4, 3, |x, y| Rgb([(x * 60 + y * 5) as u8; 3]));
        let rgba = ImageBuffer::from_fn(4, 3, |x, y| Rgba([(x * 60 + y * 5) as u8, (x * 60 + y * 5) as u8, (x * 60 + y * 5) as u8, 7]));
        let cases = [
            (DynamicImage::ImageLuma8(grey8.clone()), ImageFormat::Png),
            (DynamicImage::ImageLuma16(grey16.clone()), ImageFormat::Png),
            (DynamicImage::ImageLuma16(grey16), ImageFormat::Tiff),
            (DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Bmp),
            (DynamicImage::ImageRgb8(rgb), ImageFormat::Tiff),
            (DynamicImage::ImageRgba8(rgba), ImageFormat::Png),
        ];
        for (image, format) in cases {
            let decoded = decode(&encode(image, format)).unwrap();
            assert_eq!(decoded.dimensions(), (4, 3));
            for (a, b) in decoded.as_raw().iter().zip(&expected) {
                assert!((a - b).abs() < 1e-6, "{format:?}: {a} vs {b}");
            }
        }
        // JPEG is lossy: a flat grey image stays close to its value.
        let flat = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(16, 16, Luma([128u8])));
        let decoded = decode(&encode(flat, ImageFormat::Jpeg)).unwrap();
        assert!(decoded.as_raw().iter().all(|v| (v - 128.0 / 255.0).abs() < 0.02));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode(b"definitely not an image"), Err(Error::UnsupportedImage(_))));
        let mut png = encode(DynamicImage::ImageLuma8(ImageBuffer::from_pixel(32, 32, Luma([1u8]))), ImageFormat::Png);
        png.truncate(png.len() / 2);
        assert!(matches!(decode(&png), Err(Error::Decode(_))));
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn tensor_is_chw_and_normalised_as_the_card_says() {
        let image = Rgb32FImage::from_fn(2, 2, |x, _| Rgb([x as f32, 0.5, 1.0]));
        let pre = Preprocessing::imagenet(2);
        let t = to_tensor(&[&image], &pre, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[1] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((v[4] - (0.5 - 0.456) / 0.224).abs() < 1e-6);
        let unit: Vec<f32> = to_tensor(&[&image], &Preprocessing::unit(2), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(unit, vec![0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]);
        assert!(to_tensor(&[&image], &Preprocessing::unit(3), &Device::Cpu).is_err());
    }

    #[test]
    fn resize_gives_the_input_size() {
        let image = Rgb32FImage::from_pixel(512, 300, Rgb([0.25, 0.5, 0.75]));
        let small = resize(&image, 150);
        assert_eq!(small.dimensions(), (150, 150));
        assert!(small.as_raw().chunks(3).all(|p| (p[1] - 0.5).abs() < 1e-5));
    }
}

/// Mean chroma (max − min over the channels) on the 0..=1 scale. Radiographs
/// are grey, so anything well above zero is likely a photo or a screenshot.
pub fn colourfulness(image: &Rgb32FImage) -> f32 {
    let pixels = (image.width() as usize) * (image.height() as usize);
    if pixels == 0 {
        return 0.0;
    }
    // A sparse sample is enough for a warning and keeps large images cheap.
    let step = (pixels / 65_536).max(1);
    let (mut sum, mut count) = (0f32, 0usize);
    for pixel in image.pixels().step_by(step) {
        let [r, g, b] = pixel.0;
        sum += r.max(g).max(b) - r.min(g).min(b);
        count += 1;
    }
    sum / count as f32
}

/// Above this mean chroma an image is flagged as not looking like a radiograph.
pub const COLOURFULNESS_WARNING: f32 = 0.08;

#[cfg(test)]
mod colour_tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn grey_is_not_colourful_and_a_photo_is() {
        let grey = Rgb32FImage::from_fn(10, 10, |x, _| Rgb([x as f32 / 10.0; 3]));
        assert_eq!(colourfulness(&grey), 0.0);
        let photo = Rgb32FImage::from_fn(10, 10, |x, y| Rgb([0.9, x as f32 / 20.0, y as f32 / 30.0]));
        assert!(colourfulness(&photo) > COLOURFULNESS_WARNING);
    }
}
