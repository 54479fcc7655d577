#include <gtest/gtest.h>

#include <array>
#include <set>

#include <sys/wait.h>
#include <unistd.h>

#include "nonce.hpp"

using pgphi::NonceSource;

TEST(NonceSource, NoncesDoNotRepeatAcrossManyPools)
{
    NonceSource nonces;
    std::set<std::array<uint8_t, 12>> seen;
    for (int i = 0; i < 100000; ++i) {
        std::array<uint8_t, 12> n;
        nonces.next(n.data());
        ASSERT_TRUE(seen.insert(n).second) << "repeat at " << i;
    }
}

// A forked child must not hand out the nonces its parent already holds in its
// pool, or both would encrypt under the same nonce.
TEST(NonceSource, ForkedChildDoesNotReuseParentPool)
{
    NonceSource nonces;
    std::array<uint8_t, 12> first;
    nonces.next(first.data()); // fills the pool in the parent

    int pipe_fds[2];
    ASSERT_EQ(pipe(pipe_fds), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        std::array<uint8_t, 12> child;
        nonces.next(child.data());
        ssize_t ignored = write(pipe_fds[1], child.data(), child.size());
        (void)ignored;
        _exit(0);
    }
    std::array<uint8_t, 12> parent, child;
    nonces.next(parent.data());
    ASSERT_EQ(read(pipe_fds[0], child.data(), child.size()), 12);
    waitpid(pid, nullptr, 0);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    EXPECT_NE(parent, child);
}
