# A SoftHSM2 token for the PKCS#11 tests: its own token directory and
# configuration (SOFTHSM2_CONF is set for this process and the servers it
# starts), initialised with a label. Its user and SO PINs are drawn at test
# time, so no PIN is written in the repository; $token->{pin} is the user's.
package SoftHsmToken;

use strict;
use warnings;

use PostgreSQL::Test::Utils;

our $MODULE = '/usr/lib/softhsm/libsofthsm2.so';

# Whether SoftHSM2 and OpenSC's pkcs11-tool are installed (scripts/install-deps.sh).
sub available
{
	return -e $MODULE && system('command -v softhsm2-util pkcs11-tool >/dev/null') == 0;
}

# Eight random digits (SoftHSM2 takes PINs of 4 to 255 bytes).
sub random_pin { return join '', map { int(rand(10)) } 1 .. 8; }

# new(dir => ..., label => ...): a fresh token in `dir`.
sub new
{
	my ($class, %opts) = @_;
	my $self = bless { %opts, pin => random_pin(), so_pin => random_pin() }, $class;
	my $dir = $self->{dir};
	mkdir $dir;
	mkdir "$dir/tokens", 0700;
	open my $conf, '>', "$dir/softhsm2.conf" or die "$dir/softhsm2.conf: $!";
	print $conf "directories.tokendir = $dir/tokens\nobjectstore.backend = file\nlog.level = ERROR\n";
	close $conf;
	$ENV{SOFTHSM2_CONF} = "$dir/softhsm2.conf";
	system("softhsm2-util --init-token --free --label $self->{label} --so-pin $self->{so_pin} --pin $self->{pin} >/dev/null")
	  == 0 or die 'softhsm2-util --init-token failed';
	return $self;
}

# pkcs11-tool on the token, logged in; returns its exit status.
sub tool
{
	my ($self, $args) = @_;
	return system("pkcs11-tool --module $MODULE --token-label $self->{label} --login --pin $self->{pin} $args >/dev/null 2>&1");
}

# The labels of the token's secret keys, sorted and joined by commas.
sub secret_key_labels
{
	my ($self) = @_;
	my $out = `pkcs11-tool --module $MODULE --token-label $self->{label} --login --pin $self->{pin} --list-objects --type secrkey 2>/dev/null`;
	return join ',', sort $out =~ /label:\s+(\S+)/g;
}

1;
