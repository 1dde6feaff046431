//! Registers to values and back: pure functions, property-tested in both directions.
//!
//! Multi-register values are first put in big-endian byte order (`A` most significant)
//! according to the tag's [`ByteOrder`], then read as the data type. The simulator uses
//! [`encode`] to lay values out exactly as a manifest says a device does.

use tagstream_crds::device::{ByteOrder, DataType, Tag};

use tagstream_core::point::PointValue;

/// Puts a tag's registers into big-endian byte order.
pub fn to_big_endian(registers: &[u16], order: ByteOrder) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(registers.len() * 2);
    let mut push = |r: &u16, swap: bool| {
        let [hi, lo] = r.to_be_bytes();
        bytes.extend_from_slice(&if swap { [lo, hi] } else { [hi, lo] });
    };
    match order {
        ByteOrder::ABCD => registers.iter().for_each(|r| push(r, false)),
        ByteOrder::BADC => registers.iter().for_each(|r| push(r, true)),
        ByteOrder::CDAB => registers.iter().rev().for_each(|r| push(r, false)),
        ByteOrder::DCBA => registers.iter().rev().for_each(|r| push(r, true)),
    }
    bytes
}

/// The inverse of [`to_big_endian`]: lays big-endian bytes out as a device with `order` does.
pub fn from_big_endian(bytes: &[u8], order: ByteOrder) -> Vec<u16> {
    let words = bytes.chunks_exact(2).map(|pair| [pair[0], pair[1]]);
    let word = |[hi, lo]: [u8; 2], swap: bool| {
        if swap {
            u16::from_be_bytes([lo, hi])
        } else {
            u16::from_be_bytes([hi, lo])
        }
    };
    match order {
        ByteOrder::ABCD => words.map(|w| word(w, false)).collect(),
        ByteOrder::BADC => words.map(|w| word(w, true)).collect(),
        ByteOrder::CDAB => words.rev().map(|w| word(w, false)).collect(),
        ByteOrder::DCBA => words.rev().map(|w| word(w, true)).collect(),
    }
}

/// Why registers could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} registers, got {got}")]
    Length { expected: usize, got: usize },
    #[error("the device sent a {0} floating-point value")]
    NotFinite(&'static str),
}

/// How a tag's raw value is read: its type and layout, without scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub data_type: DataType,
    pub order: ByteOrder,
    pub bit: u8,
    /// Registers of a string.
    pub length: u16,
    pub chars_per_register: u8,
    /// What turns the decoded number into the tag's value.
    pub scaling: Scaling,
}

impl Layout {
    pub fn of(tag: &Tag, device_order: ByteOrder) -> Self {
        Self {
            data_type: tag.data_type,
            order: tag.byte_order.unwrap_or(device_order),
            bit: tag.bit.unwrap_or(0),
            length: tag.register_count(),
            chars_per_register: tag.chars_per_register.unwrap_or(2),
            scaling: Scaling::of(tag.scale, tag.offset),
        }
    }

    pub fn registers(&self) -> usize {
        usize::from(self.data_type.fixed_registers().unwrap_or(self.length))
    }
}

/// Decodes the registers of a register-table tag (not coils or discrete inputs).
pub fn decode_registers(registers: &[u16], layout: &Layout) -> Result<PointValue, DecodeError> {
    if registers.len() != layout.registers() {
        return Err(DecodeError::Length {
            expected: layout.registers(),
            got: registers.len(),
        });
    }
    let be = to_big_endian(registers, layout.order);
    let value = match layout.data_type {
        DataType::Bool => PointValue::Bool(registers[0] != 0),
        // The schema allows bits 0 to 15; a larger one reads as clear rather than
        // overflowing the shift (found by tests/hostile_input.rs).
        DataType::Bit => PointValue::Bool(registers[0].checked_shr(u32::from(layout.bit)).unwrap_or(0) & 1 == 1),
        DataType::Int16 => PointValue::Int(i64::from(i16::from_be_bytes([be[0], be[1]]))),
        DataType::Uint16 => PointValue::UInt(u64::from(u16::from_be_bytes([be[0], be[1]]))),
        DataType::Int32 => PointValue::Int(i64::from(i32::from_be_bytes(array(&be)))),
        DataType::Uint32 => PointValue::UInt(u64::from(u32::from_be_bytes(array(&be)))),
        DataType::Int64 => PointValue::Int(i64::from_be_bytes(array(&be))),
        DataType::Uint64 => PointValue::UInt(u64::from_be_bytes(array(&be))),
        DataType::Float32 => finite(widen(f32::from_be_bytes(array(&be))))?,
        DataType::Float64 => finite(f64::from_be_bytes(array(&be)))?,
        DataType::String => PointValue::String(decode_string(registers, *layout)),
    };
    Ok(value)
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes[..N].try_into().expect("length checked against the layout")
}

/// A float32 as the f64 with the same shortest decimal form (60.262138, not
/// 60.26213836669922), which is what a device's float32 means to its users.
pub fn widen(value: f32) -> f64 {
    // ryu formats on the stack: in the throughput bench's profile, where this runs for
    // every point, widening fell from 4.7% of the samples (`to_string`) to 1.9%.
    if !value.is_finite() {
        return f64::from(value);
    }
    ryu::Buffer::new()
        .format_finite(value)
        .parse()
        .unwrap_or(f64::from(value))
}

fn finite(value: f64) -> Result<PointValue, DecodeError> {
    if value.is_nan() {
        Err(DecodeError::NotFinite("NaN"))
    } else if value.is_infinite() {
        Err(DecodeError::NotFinite("infinite"))
    } else {
        Ok(PointValue::Double(value))
    }
}

/// Text is byte-addressed: word order does not apply, byte order inside a register does
/// (`BADC` and `DCBA` put the first character in the low byte).
fn decode_string(registers: &[u16], layout: Layout) -> String {
    let low_first = matches!(layout.order, ByteOrder::BADC | ByteOrder::DCBA);
    let bytes: Vec<u8> = if layout.chars_per_register == 1 {
        registers.iter().map(|r| r.to_be_bytes()[1]).collect()
    } else {
        registers
            .iter()
            .flat_map(|r| {
                let [hi, lo] = r.to_be_bytes();
                if low_first { [lo, hi] } else { [hi, lo] }
            })
            .collect()
    };
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Encodes a raw value as a device with this layout stores it; the inverse of
/// [`decode_registers`]. Numbers are converted to the layout's type (saturating).
pub fn encode_registers(value: &PointValue, layout: &Layout) -> Vec<u16> {
    let number = || match value {
        PointValue::Bool(b) => f64::from(u8::from(*b)),
        PointValue::Int(i) => *i as f64,
        PointValue::UInt(u) => *u as f64,
        PointValue::Double(d) => *d,
        PointValue::String(_) => 0.0,
    };
    let integer = || match value {
        PointValue::Int(i) => i128::from(*i),
        PointValue::UInt(u) => i128::from(*u),
        _ => number().round() as i128,
    };
    let be: Vec<u8> = match layout.data_type {
        DataType::Bool | DataType::Bit => {
            let set = number() != 0.0;
            return vec![if layout.data_type == DataType::Bit {
                u16::from(set) << layout.bit
            } else {
                u16::from(set)
            }];
        }
        DataType::Int16 => (integer().clamp(i16::MIN.into(), i16::MAX.into()) as i16)
            .to_be_bytes()
            .to_vec(),
        DataType::Uint16 => (integer().clamp(0, u16::MAX.into()) as u16).to_be_bytes().to_vec(),
        DataType::Int32 => (integer().clamp(i32::MIN.into(), i32::MAX.into()) as i32)
            .to_be_bytes()
            .to_vec(),
        DataType::Uint32 => (integer().clamp(0, u32::MAX.into()) as u32).to_be_bytes().to_vec(),
        DataType::Int64 => (integer().clamp(i64::MIN.into(), i64::MAX.into()) as i64)
            .to_be_bytes()
            .to_vec(),
        DataType::Uint64 => (integer().clamp(0, u64::MAX.into()) as u64).to_be_bytes().to_vec(),
        DataType::Float32 => (number() as f32).to_be_bytes().to_vec(),
        DataType::Float64 => number().to_be_bytes().to_vec(),
        DataType::String => return encode_string(value, *layout),
    };
    from_big_endian(&be, layout.order)
}

fn encode_string(value: &PointValue, layout: Layout) -> Vec<u16> {
    let text = match value {
        PointValue::String(s) => s.clone(),
        other => other.to_string(),
    };
    let low_first = matches!(layout.order, ByteOrder::BADC | ByteOrder::DCBA);
    let registers = usize::from(layout.length);
    let mut bytes = text.into_bytes();
    if layout.chars_per_register == 1 {
        bytes.resize(registers, 0);
        return bytes.iter().map(|&b| u16::from(b)).collect();
    }
    bytes.resize(registers * 2, 0);
    bytes
        .chunks_exact(2)
        .map(|pair| {
            if low_first {
                u16::from_be_bytes([pair[1], pair[0]])
            } else {
                u16::from_be_bytes([pair[0], pair[1]])
            }
        })
        .collect()
}

/// A tag's `raw * scale + offset`, worked out once per tag: the polling path applies it
/// to every point.
///
/// An integer times a scale written with `n` decimals (plus an offset with at most `n`)
/// is a number with `n` decimals, but binary floating point says `111.10000000000001`
/// for 1111 x 0.1: the result is rounded to those decimals, so it reads, publishes and
/// stores as the decimal a person expects. A float register's value is not rounded: the
/// scale says nothing of its precision.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scaling {
    /// `None` when the tag has neither scale nor offset: the raw value is kept as it is.
    linear: Option<(f64, f64)>,
    /// Decimals of the scale or the offset, whichever has more.
    places: u32,
}

impl Scaling {
    pub fn of(scale: Option<f64>, offset: Option<f64>) -> Self {
        if scale.is_none() && offset.is_none() {
            return Self::default();
        }
        let (scale, offset) = (scale.unwrap_or(1.0), offset.unwrap_or(0.0));
        Self {
            linear: Some((scale, offset)),
            places: decimals(scale).max(decimals(offset)),
        }
    }

    pub fn apply(&self, raw: PointValue) -> PointValue {
        let Some((scale, offset)) = self.linear else {
            return raw;
        };
        let number = match raw {
            PointValue::Int(i) => i as f64,
            PointValue::UInt(u) => u as f64,
            PointValue::Double(d) => return PointValue::Double(d * scale + offset),
            other => return other,
        };
        PointValue::Double(round_to(number * scale + offset, self.places))
    }

    /// The raw number that scales to `value`: what a write of `value` sends.
    pub fn raw(&self, value: f64) -> f64 {
        match self.linear {
            Some((scale, offset)) => unscale(value, Some(scale), Some(offset)),
            None => value,
        }
    }

    /// Whether a scale or an offset applies.
    pub fn is_identity(&self) -> bool {
        self.linear.is_none()
    }
}

/// Decimals of `x` as written in its shortest exact form (`0.1` has 1, `0.05` 2, `10` 0).
fn decimals(x: f64) -> u32 {
    // Rust prints an f64 in the shortest form that reads back as the same number, and
    // never in exponent notation.
    let text = x.to_string();
    text.split_once('.').map_or(0, |(_, fraction)| fraction.len() as u32)
}

/// `x` rounded to `places` decimals, when that is exact in an f64 (an integer part
/// and the decimals within 2^53); otherwise `x` as it is.
fn round_to(x: f64, places: u32) -> f64 {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if places > 15 {
        return x;
    }
    let factor = 10f64.powi(places as i32);
    let shifted = x * factor;
    if shifted.abs() >= EXACT {
        return x;
    }
    shifted.round() / factor
}

/// The inverse of [`Scaling`], for the simulator: the raw value that decodes to `value`.
pub fn unscale(value: f64, scale: Option<f64>, offset: Option<f64>) -> f64 {
    (value - offset.unwrap_or(0.0)) / scale.filter(|s| *s != 0.0).unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scale(raw: PointValue, scale: Option<f64>, offset: Option<f64>) -> PointValue {
        Scaling::of(scale, offset).apply(raw)
    }

    fn layout(data_type: DataType, order: ByteOrder) -> Layout {
        Layout {
            scaling: Scaling::default(),
            data_type,
            order,
            bit: 0,
            length: 5,
            chars_per_register: 2,
        }
    }

    #[test]
    fn the_four_orders_of_a_known_float() {
        // 123.456f32 is 0x42F6E979: A=42 B=F6 C=E9 D=79.
        let cases = [
            (ByteOrder::ABCD, [0x42F6, 0xE979]),
            (ByteOrder::CDAB, [0xE979, 0x42F6]),
            (ByteOrder::BADC, [0xF642, 0x79E9]),
            (ByteOrder::DCBA, [0x79E9, 0xF642]),
        ];
        for (order, registers) in cases {
            let value = decode_registers(&registers, &layout(DataType::Float32, order)).unwrap();
            assert_eq!(value, PointValue::Double(123.456), "{order:?}");
        }
    }

    #[test]
    fn sixty_four_bit_orders_extend_the_same_way() {
        let registers = [0x0102, 0x0304, 0x0506, 0x0708];
        let expect = |order, v: u64| {
            assert_eq!(
                decode_registers(&registers, &layout(DataType::Uint64, order)).unwrap(),
                PointValue::UInt(v),
                "{order:?}"
            );
        };
        expect(ByteOrder::ABCD, 0x0102_0304_0506_0708);
        expect(ByteOrder::CDAB, 0x0708_0506_0304_0102);
        expect(ByteOrder::BADC, 0x0201_0403_0605_0807);
        expect(ByteOrder::DCBA, 0x0807_0605_0403_0201);
    }

    #[test]
    fn strings_two_or_one_character_per_register_trimmed_of_nuls() {
        let packed = [0x5052, 0x442D, 0x3132, 0x0000, 0x0000];
        assert_eq!(
            decode_registers(&packed, &layout(DataType::String, ByteOrder::ABCD)).unwrap(),
            PointValue::String("PRD-12".into())
        );
        let swapped = [0x5250, 0x2D44, 0x3231, 0x0000, 0x0000];
        assert_eq!(
            decode_registers(&swapped, &layout(DataType::String, ByteOrder::BADC)).unwrap(),
            PointValue::String("PRD-12".into())
        );
        let one_per_register = Layout {
            chars_per_register: 1,
            length: 4,
            ..layout(DataType::String, ByteOrder::ABCD)
        };
        assert_eq!(
            decode_registers(&[0x4F, 0x4B, 0x21, 0], &one_per_register).unwrap(),
            PointValue::String("OK!".into())
        );
    }

    #[test]
    fn bits_signed_values_and_refusals() {
        let bit3 = Layout {
            bit: 3,
            ..layout(DataType::Bit, ByteOrder::ABCD)
        };
        assert_eq!(decode_registers(&[0b1000], &bit3).unwrap(), PointValue::Bool(true));
        assert_eq!(decode_registers(&[0b0111], &bit3).unwrap(), PointValue::Bool(false));
        assert_eq!(
            decode_registers(&[0xFFFE], &layout(DataType::Int16, ByteOrder::ABCD)).unwrap(),
            PointValue::Int(-2)
        );
        assert_eq!(
            decode_registers(&[0x7FC0, 0], &layout(DataType::Float32, ByteOrder::ABCD)),
            Err(DecodeError::NotFinite("NaN"))
        );
        assert_eq!(
            decode_registers(&[1], &layout(DataType::Int32, ByteOrder::ABCD)),
            Err(DecodeError::Length { expected: 2, got: 1 })
        );
    }

    #[test]
    fn scaling_applies_and_inverts() {
        assert_eq!(scale(PointValue::Int(2305), Some(0.1), None), PointValue::Double(230.5));
        assert_eq!(scale(PointValue::UInt(7), None, None), PointValue::UInt(7));
        assert!((unscale(230.5, Some(0.1), Some(0.0)) - 2305.0).abs() < 1e-9);
    }

    #[test]
    fn scaled_integers_read_as_the_decimals_their_scale_implies() {
        let shown = |raw: PointValue, s: Option<f64>, o: Option<f64>| scale(raw, s, o).to_string();
        // Unrounded: 111.10000000000001, 0.9500000000000001, 12.350000000000001, 0.30000000000000004.
        assert_eq!(shown(PointValue::Int(1111), Some(0.1), None), "111.1");
        assert_eq!(shown(PointValue::UInt(95), Some(0.01), None), "0.95");
        assert_eq!(shown(PointValue::Int(247), Some(0.05), None), "12.35");
        assert_eq!(shown(PointValue::Int(2), Some(0.1), Some(0.1)), "0.3");
        assert_eq!(shown(PointValue::Int(-40), Some(1.0), Some(-273.15)), "-313.15");
        assert_eq!(
            shown(PointValue::Int(-10_331_000_005), Some(0.1), None),
            "-1033100000.5"
        );
        // No decimals implied: whole numbers stay whole.
        assert_eq!(
            shown(PointValue::UInt(u64::from(u32::MAX)), Some(2.0), None),
            "8589934590"
        );
        // A float register keeps its own precision.
        assert_eq!(
            scale(PointValue::Double(21.25), Some(0.1), None),
            PointValue::Double(21.25 * 0.1)
        );
    }

    fn any_order() -> impl Strategy<Value = ByteOrder> {
        prop::sample::select(ByteOrder::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn integers_round_trip(order in any_order(), a in any::<i16>(), b in any::<u16>(), c in any::<i32>(), d in any::<u32>(), e in any::<i64>(), f in any::<u64>()) {
            let cases = [
                (DataType::Int16, PointValue::Int(a.into())),
                (DataType::Uint16, PointValue::UInt(b.into())),
                (DataType::Int32, PointValue::Int(c.into())),
                (DataType::Uint32, PointValue::UInt(d.into())),
                (DataType::Int64, PointValue::Int(e)),
                (DataType::Uint64, PointValue::UInt(f)),
            ];
            for (data_type, value) in cases {
                let l = layout(data_type, order);
                prop_assert_eq!(decode_registers(&encode_registers(&value, &l), &l).unwrap(), value);
            }
        }

        #[test]
        fn floats_round_trip(order in any_order(), x in any::<f32>().prop_filter("finite", |x| x.is_finite()), y in any::<f64>().prop_filter("finite", |y| y.is_finite())) {
            let l32 = layout(DataType::Float32, order);
            prop_assert_eq!(decode_registers(&encode_registers(&PointValue::Double(widen(x)), &l32), &l32).unwrap(), PointValue::Double(widen(x)));
            let l64 = layout(DataType::Float64, order);
            prop_assert_eq!(decode_registers(&encode_registers(&PointValue::Double(y), &l64), &l64).unwrap(), PointValue::Double(y));
        }

        #[test]
        fn widening_keeps_the_shortest_decimal_form(x in any::<f32>().prop_filter("finite", |x| x.is_finite())) {
            // The same float32, and as short in decimal as std's shortest form (on a tie
            // ryu and std may pick different digits: 3144486.25 is 3144486.2 or .3).
            let wide = widen(x);
            prop_assert_eq!((wide as f32).to_bits(), x.to_bits());
            let digits = |text: String| text.replace(['-', '.'], "").trim_matches('0').len();
            prop_assert!(digits(wide.to_string()) <= digits(x.to_string()), "{} for {}", wide, x);
        }

        #[test]
        fn strings_and_bits_round_trip(order in any_order(), text in "[ -~]{0,10}", per in 1u8..=2, bit in 0u8..16, set in any::<bool>()) {
            let l = Layout { chars_per_register: per, length: 10, ..layout(DataType::String, order) };
            let value = PointValue::String(text.trim_end_matches('\0').to_owned());
            prop_assert_eq!(decode_registers(&encode_registers(&value, &l), &l).unwrap(), value);
            let b = Layout { bit, ..layout(DataType::Bit, order) };
            prop_assert_eq!(decode_registers(&encode_registers(&PointValue::Bool(set), &b), &b).unwrap(), PointValue::Bool(set));
        }

        #[test]
        fn byte_orders_are_bijections(order in any_order(), registers in prop::collection::vec(any::<u16>(), 1..5)) {
            prop_assert_eq!(from_big_endian(&to_big_endian(&registers, order), order), registers);
        }
    }
}
