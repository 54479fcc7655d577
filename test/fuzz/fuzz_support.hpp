// Shared by the provider-response fuzz targets: runs one parser on untrusted
// input and aborts, naming the parser, unless it either returns or refuses
// the input with a pgphi::Error of an expected kind. Any other exception
// (nlohmann's type errors, std::out_of_range, ...) would reach users as an
// internal error (XX000) instead of a clear one, so it counts as a finding.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <string>

#include "error.hpp"

namespace fuzz {

[[noreturn]] inline void fail(const char* parser, const char* what)
{
    std::fprintf(stderr, "fuzz finding in %s: %s\n", parser, what);
    std::abort();
}

// Returns true when `fn` returned, false when it refused the input with one
// of `allowed`.
template <typename Fn>
bool refuses_cleanly(const char* parser, std::initializer_list<pgphi::ErrorCode> allowed, Fn&& fn)
{
    try {
        fn();
        return true;
    } catch (const pgphi::Error& e) {
        for (pgphi::ErrorCode code : allowed)
            if (e.code() == code)
                return false;
        fail(parser, (std::string("unexpected error code: ") + e.what()).c_str());
    } catch (const std::exception& e) {
        fail(parser, (std::string("exception other than pgphi::Error: ") + e.what()).c_str());
    } catch (...) {
        fail(parser, "unknown exception");
    }
}

inline void require(bool condition, const char* parser, const char* what)
{
    if (!condition)
        fail(parser, what);
}

// True when every byte of `s` is zero: a wiped secret.
inline bool wiped(const std::string& s)
{
    for (char c : s)
        if (c != 0)
            return false;
    return true;
}

// True when `s` is one word of visible ASCII, fit for an HTTP header or a
// URL path segment.
inline bool header_safe(const std::string& s)
{
    if (s.empty())
        return false;
    for (char c : s)
        if (c < 0x21 || c > 0x7e)
            return false;
    return true;
}

} // namespace fuzz
