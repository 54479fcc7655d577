// The boundary between the C++ core and PostgreSQL.
//
// PostgreSQL reports errors with longjmp, which skips C++ destructors; C++
// reports errors with exceptions, which PostgreSQL cannot catch. So:
//
//  * Core code (anything that may throw or owns C++ objects) runs only inside
//    call_core(), which catches every exception, lets all C++ frames unwind,
//    and only then raises the PostgreSQL error.
//  * Code inside call_core() never calls a PostgreSQL function that can raise
//    an error (no palloc, no SPI): buffers are allocated before, results used
//    after.
//  * Functions in src/pg/ keep no C++ object with a destructor alive across a
//    call that can raise an error; CoreFailure is plain data for that reason.
#pragma once

#include <cstddef>
#include <exception>
#include <new>

#include "core/error.hpp"

namespace pgphi::pg {

// What a failed core call reported, copied into fixed buffers.
struct CoreFailure {
    ErrorCode code;
    char message[512];
    char detail[512];
    char hint[256];

    void capture(ErrorCode code, const char* message, const char* detail, const char* hint) noexcept;
};

// Raises the PostgreSQL error for a failure. `sqlstate` overrides the code's
// default SQLSTATE when non-zero (type input uses 22P02, for instance).
[[noreturn]] void raise_core_failure(const CoreFailure& failure, int sqlstate = 0);

// Runs `fn`; returns false and fills `failure` if it threw.
template <typename Fn>
bool run_core(CoreFailure& failure, Fn&& fn) noexcept
{
    try {
        fn();
        return true;
    } catch (const Error& e) {
        failure.capture(e.code(), e.what(), e.detail().c_str(), e.hint().c_str());
    } catch (const std::bad_alloc&) {
        failure.capture(ErrorCode::Internal, "out of memory", "", "");
    } catch (const std::exception& e) {
        failure.capture(ErrorCode::Internal, e.what(), "", "");
    } catch (...) {
        failure.capture(ErrorCode::Internal, "unexpected exception in pgphi", "", "");
    }
    return false;
}

// Runs `fn` and raises the PostgreSQL error if it threw. The try block has
// ended, and every C++ frame inside it is gone, before the error is raised.
template <typename Fn>
void call_core(Fn&& fn, int sqlstate = 0)
{
    CoreFailure failure;
    if (!run_core(failure, fn))
        raise_core_failure(failure, sqlstate);
}

} // namespace pgphi::pg
