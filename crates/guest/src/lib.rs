// SPDX-License-Identifier: Apache-2.0
//! placeholder
#![deny(missing_docs)]
