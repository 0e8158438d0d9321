//! The one path from file bytes to the model's input, used by training,
//! native detection and the browser alike:
//! [`decode`] → [`resize`] → (augmentation, in training only) → [`to_tensor`].

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Rgb32FImage};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// ImageNet statistics, as used by torchvision and Keras' DenseNet `preprocess_input`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How bytes become the model's input: decode to RGB, resize (bilinear, aspect
/// not kept, as Keras' `image_dataset_from_directory`), divide by 255, then
/// subtract `mean` and divide by `std` per channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Preprocessing {
    pub input_size: usize,
    pub resize: String,
    pub channels: String,
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocessing {
    /// The study's naive CNN: `Rescaling(1/255)` only.
    pub fn unit(input_size: usize) -> Self {
        Self {
            input_size,
            resize: "bilinear".into(),
            channels: "rgb".into(),
            scale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    /// DenseNet: 1/255, then ImageNet mean and std.
    pub fn imagenet(input_size: usize) -> Self {
        Self {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            ..Self::unit(input_size)
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(8..=2048).contains(&self.input_size) {
            return Err(Error::Card(format!(
                "input_size {} is outside 8..=2048",
                self.input_size
            )));
        }
        if self.resize != "bilinear" || self.channels != "rgb" {
            return Err(Error::Card(format!(
                "unsupported preprocessing: resize `{}`, channels `{}` (expected bilinear, rgb)",
                self.resize, self.channels
            )));
        }
        if (self.scale - 1.0 / 255.0).abs() > 1e-9 {
            return Err(Error::Card(format!(
                "unsupported scale {} (expected 1/255)",
                self.scale
            )));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Card(format!(
                "invalid mean {:?} / std {:?}",
                self.mean, self.std
            )));
        }
        Ok(())
    }
}

/// A view of the input that test-time augmentation averages over.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TtaView {
    Identity,
    /// Mirrored left-right, as the training augmentation does.
    HorizontalFlip,
}

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
    let Some(format) = reader.format() else {
        return Err(Error::UnsupportedImage(
            "unrecognised format (expected PNG, JPEG, BMP, TIFF or DICOM)".into(),
        ));
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(Error::Decode(
            "truncated JPEG (the data ends before the end-of-image marker)".into(),
        ));
    }
    let decoder = reader.into_decoder().map_err(|e| Error::Decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    check_pixel_budget(width, height)?;
    if format == ImageFormat::Jpeg && width.max(height) > MAX_JPEG_SIDE {
        return Err(Error::UnsupportedImage(format!(
            "{width}x{height} JPEG: the decoder cannot read a side over {MAX_JPEG_SIDE} pixels"
        )));
    }
    if format == ImageFormat::Jpeg {
        jpeg_holds_its_blocks(bytes.len(), width, height)?;
    }
    let image = DynamicImage::from_decoder(decoder).map_err(|e| Error::Decode(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::Decode("image has no pixels".into()));
    }
    // to_rgb32f scales 8- and 16-bit samples alike to 0..=1.
    Ok(image.to_rgb32f())
}

/// The most pixels an image may have: its RGB f32 form stays under 512 MiB.
/// Checked from the header, before anything of that size is allocated, here
/// and in the browser alike (they share this function). 44 megapixels is
/// well above any radiograph (a 43×43 cm detector at 100 µm is 18.5).
pub const MAX_PIXELS: u64 = 512 * 1024 * 1024 / 12;

pub(crate) fn check_pixel_budget(width: u32, height: u32) -> Result<()> {
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(Error::UnsupportedImage(format!(
            "{width}x{height} pixels is more than the {} megapixels an X-ray needs",
            MAX_PIXELS / 1_000_000
        )));
    }
    Ok(())
}

/// The longest JPEG side the decoder reads whole. zune-jpeg counts a grey
/// image's 8-pixel blocks as `(side + 7) / 8` in 16 bits: above 65,528 that
/// wraps to zero rows of blocks, and the image comes back blank, to be scored
/// like any other (in builds with overflow checks, a panic). The format's own
/// limit is 65,535.
const MAX_JPEG_SIDE: u32 = 65_528;

/// A JPEG codes every 8×8 block of its full-resolution component with at
/// least one Huffman code of at least one bit (the DC difference), so a file
/// of fewer bytes than that cannot hold its image, whatever markers it has.
/// zune-jpeg would decode the missing blocks from whatever follows as filler,
/// and in builds with overflow checks panic when the DC prediction it sums
/// over them overflows (found by `cargo xtask fuzz decode_image`).
fn jpeg_holds_its_blocks(file_len: usize, width: u32, height: u32) -> Result<()> {
    let blocks = u64::from(width.div_ceil(8)) * u64::from(height.div_ceil(8));
    let least = blocks.div_ceil(8);
    if (file_len as u64) < least {
        return Err(Error::Decode(format!(
            "{width}x{height} JPEG in {file_len} bytes: its {blocks} blocks of 8x8 pixels need at least \
             {least} (a bit each), so the file is truncated or corrupt"
        )));
    }
    Ok(())
}

/// Whether a JPEG's last scan is followed by its end-of-image marker. The
/// decoder fills a cut-off file's missing rows with grey and says nothing,
/// which a model would score like any other image. Inside entropy-coded
/// data a 0xFF byte is always followed by 0x00 or a restart marker, so an
/// FF D9 after the last start-of-scan is the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
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

/// The input as a TTA view sees it.
pub fn view_input(view: TtaView, xs: &Tensor) -> candle_core::Result<Tensor> {
    match view {
        TtaView::Identity => Ok(xs.clone()),
        // (batch, channels, height, width): mirrored along the width.
        TtaView::HorizontalFlip => xs.flip(&[3]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(image: image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
        bytes
    }

    #[test]
    fn an_image_over_the_pixel_budget_is_refused_from_its_header() {
        // 64 megapixels of zeros: a 64 KB file that would take 768 MB as RGB f32.
        let side = 8000;
        let bytes = encoded(
            image::DynamicImage::ImageLuma8(image::GrayImage::new(side, side)),
            ImageFormat::Png,
        );
        assert!(bytes.len() < 1 << 20, "{} bytes", bytes.len());
        let error = decode(&bytes).unwrap_err().to_string();
        assert!(
            error.contains("8000x8000 pixels is more than the 44 megapixels"),
            "{error}"
        );
        let within = encoded(
            image::DynamicImage::ImageLuma8(image::GrayImage::new(600, 400)),
            ImageFormat::Png,
        );
        assert_eq!(decode(&within).unwrap().dimensions(), (600, 400));
    }

    /// Found by `cargo xtask fuzz decode_image`: a grey 40x65535 JPEG with
    /// vertical subsampling, whose block count overflowed in the decoder.
    #[test]
    fn a_jpeg_too_tall_for_the_decoder_is_refused_not_decoded_blank() {
        let bytes =
            include_bytes!("../../../fuzz/regressions/decode_image/crash-9f343ec7027efd2222bac60c116864d04716e156");
        let error = decode(bytes).unwrap_err().to_string();
        assert!(error.contains("40x65535 JPEG"), "{error}");
        // The same limit holds for a plain encoder's file, and the longest side read stays readable.
        let tall = |height: u16| {
            let mut jpeg = encoded(
                image::DynamicImage::ImageLuma8(image::GrayImage::new(8, 8)),
                ImageFormat::Jpeg,
            );
            let frame = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
            jpeg[frame + 5..frame + 7].copy_from_slice(&height.to_be_bytes());
            jpeg
        };
        assert!(decode(&tall(65_529)).unwrap_err().to_string().contains("8x65529 JPEG"));
        assert!(!decode(&tall(65_528)).is_err_and(|e| e.to_string().contains("cannot read a side")));
    }

    /// Found by `cargo xtask fuzz decode_image`: 644 bytes declaring a
    /// 65499x224 colour JPEG, with an end marker; zune-jpeg summed filler DC
    /// differences over 229,264 blocks until the prediction overflowed.
    #[test]
    fn a_jpeg_too_small_for_its_blocks_is_refused() {
        let bytes =
            include_bytes!("../../../fuzz/regressions/decode_image/crash-657a6d01bc889e3bbd34749192f5749f9b65f6e5");
        let error = decode(bytes).unwrap_err().to_string();
        assert!(error.contains("65499x224 JPEG in 644 bytes"), "{error}");
        // A whole flat image is far above the bound; the same file declaring
        // more blocks than its bytes can code is refused.
        let flat = encoded(
            image::DynamicImage::ImageLuma8(image::GrayImage::new(256, 256)),
            ImageFormat::Jpeg,
        );
        assert!(decode(&flat).is_ok());
        let frame = flat.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut enlarged = flat.clone();
        enlarged[frame + 5..frame + 9].copy_from_slice(&[0x10, 0x00, 0x10, 0x00]);
        let error = decode(&enlarged).unwrap_err().to_string();
        assert!(error.contains("4096x4096 JPEG in"), "{error}");
    }

    #[test]
    fn a_truncated_jpeg_or_png_is_refused_not_filled_in() {
        let gradient = image::GrayImage::from_fn(96, 64, |x, y| image::Luma([(x * 2 + y) as u8]));
        for format in [ImageFormat::Jpeg, ImageFormat::Png] {
            let bytes = encoded(image::DynamicImage::ImageLuma8(gradient.clone()), format);
            assert!(decode(&bytes).is_ok(), "{format:?}: the whole file decodes");
            // Cut inside the pixel data; a JPEG also without its last two bytes (the end marker).
            let jpeg_end = if format == ImageFormat::Jpeg {
                vec![bytes.len() - 2]
            } else {
                vec![]
            };
            for keep in [bytes.len() / 2, 600.min(bytes.len() - 3)].into_iter().chain(jpeg_end) {
                let error = decode(&bytes[..keep]).map(|_| ()).unwrap_err().to_string();
                assert!(
                    !error.is_empty(),
                    "{format:?} cut at {keep} of {} bytes decoded",
                    bytes.len()
                );
            }
        }
        let jpeg = encoded(image::DynamicImage::ImageLuma8(gradient), ImageFormat::Jpeg);
        let error = decode(&jpeg[..jpeg.len() / 2]).unwrap_err().to_string();
        assert!(error.contains("truncated JPEG"), "{error}");
    }
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
        let rgba = ImageBuffer::from_fn(4, 3, |x, y| {
            Rgba([
                (x * 60 + y * 5) as u8,
                (x * 60 + y * 5) as u8,
                (x * 60 + y * 5) as u8,
                7,
            ])
        });
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
        assert!(matches!(
            decode(b"definitely not an image"),
            Err(Error::UnsupportedImage(_))
        ));
        let mut png = encode(
            DynamicImage::ImageLuma8(ImageBuffer::from_pixel(32, 32, Luma([1u8]))),
            ImageFormat::Png,
        );
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

    /// Writes the `decode_image` fuzz seeds of the layouts the first seeds
    /// lacked (32-bit BMP, grey JPEG, grey-alpha PNG, 16-bit RGB
    /// PNG, RGBA TIFF): run with `cargo test -p fracture-core --lib
    /// write_image_fuzz_seeds -- --ignored`, then commit them. Each is a
    /// different decoder loop, which mutating another layout rarely reaches.
    #[test]
    #[ignore = "writes fuzz/seeds/decode_image; run by hand"]
    fn write_image_fuzz_seeds() {
        let grey = image::GrayImage::from_fn(12, 9, |x, y| image::Luma([(x * 20 + y * 7) as u8]));
        let rgba = image::RgbaImage::from_fn(7, 5, |x, y| image::Rgba([(x * 30) as u8, (y * 50) as u8, 90, 200]));
        let grey_alpha = image::GrayAlphaImage::from_fn(6, 4, |x, y| image::LumaA([(x * 40) as u8, (y * 60) as u8]));
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(5, 3, |x, y| {
            image::Rgb([(x * 9000) as u16, (y * 20000) as u16, 40000])
        });
        let seeds = [
            (
                "rgba.bmp",
                encoded(image::DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Bmp),
            ),
            (
                "grey.jpg",
                encoded(image::DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg),
            ),
            (
                "grey-alpha.png",
                encoded(image::DynamicImage::ImageLumaA8(grey_alpha), ImageFormat::Png),
            ),
            (
                "rgb-16bit.png",
                encoded(image::DynamicImage::ImageRgb16(rgb16), ImageFormat::Png),
            ),
            (
                "rgba.tiff",
                encoded(image::DynamicImage::ImageRgba8(rgba), ImageFormat::Tiff),
            ),
        ];
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/decode_image");
        for (name, bytes) in seeds {
            decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            std::fs::write(folder.join(name), bytes).unwrap();
        }
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
