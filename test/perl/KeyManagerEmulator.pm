# Starts the Vault / KMS emulator (test/emulator) for a TAP test, with a test
# PKI generated on the spot, and drives its control API.
package KeyManagerEmulator;

use strict;
use warnings;

use File::Path qw(make_path);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $python = '/usr/bin/python3';    # Debian's, which has python3-cryptography

sub emulator_dir { return "$ENV{PGPHI_TEST_DIR}/emulator"; }

# The IAM policy and the Vault policy that docs/providers-vault-and-kms.md
# prints: pgphi's credentials at the emulator get exactly these, so a policy
# that lacks a permission pgphi uses fails the tests.
sub kms_policy_file { return "$ENV{PGPHI_TEST_DIR}/../docs/policies/pgphi-kms-iam-policy.json"; }
sub vault_policy_file { return "$ENV{PGPHI_TEST_DIR}/../docs/policies/pgphi-vault-policy.hcl"; }

# Creates the CA, server, client, expired and foreign certificates in $dir.
sub make_pki
{
	my ($dir) = @_;
	make_path($dir);
	system('bash', emulator_dir() . '/make_test_pki.sh', $dir) == 0
	  or die "could not create the test PKI";
	return $dir;
}

# new(pki => DIR, name => NAME, cert => 'server', extra => [...])
sub new
{
	my ($class, %params) = @_;
	my $self = bless {}, $class;
	my $name = $params{name} // 'emulator';
	$self->{pki} = $params{pki};
	$self->{state} = "$PostgreSQL::Test::Utils::tmp_check/$name";
	$self->{admin_token} = 'admin-' . int(rand(1e9));
	$self->{vault_root_token} = 'root-' . int(rand(1e9));
	$self->{approle} = ['role-' . int(rand(1e9)), 'secret-' . int(rand(1e9))];
	$self->{aws} = ['AKIDPGPHITEST' . int(rand(1e6)), 'secret/' . int(rand(1e9))];
	# The tests' own administrator (aws kms update-alias, create-key ...): no policy.
	$self->{aws_admin} = ['AKIDPGPHIADMIN' . int(rand(1e6)), 'secret/' . int(rand(1e9))];
	# pgphi's Vault token: the documented policy, not root.
	$self->{vault_token} = 'hvs.pgphi-' . int(rand(1e9));
	$self->{kms_key} = $params{kms_key} // '1234abcd-12ab-34cd-56ef-1234567890ab';
	$self->{vault_key} = $params{vault_key} // 'pgphi-kek';
	make_path($self->{state});
	unlink "$self->{state}/port";

	my $cert = $params{cert} // 'server';
	$self->{mtls} = $params{client_ca} ? 1 : 0;
	my @cmd = (
		$python, emulator_dir() . '/keymanager_emulator.py',
		'--port', '0',
		'--cert', "$self->{pki}/$cert.pem", '--key', "$self->{pki}/$cert.key",
		'--state-dir', $self->{state},
		'--admin-token', $self->{admin_token},
		'--vault-root-token', $self->{vault_root_token},
		'--approle', join(':', @{ $self->{approle} }),
		'--vault-policy', 'pgphi=' . ($params{vault_policy} // vault_policy_file()),
		'--approle-policies', 'pgphi',
		'--vault-token', "$self->{vault_token}=pgphi",
		'--require-request-header',
		'--aws-credential', join(':', @{ $self->{aws_admin} }),
		'--aws-policy', "$self->{aws}[0]=" . ($params{kms_policy} // kms_policy_file()),
		'--approle-token-ttl', $params{approle_ttl} // 60,
		'--aws-credential', join(':', @{ $self->{aws} }),
		'--region', 'us-east-1',
		'--kms-key', $self->{kms_key},
		'--vault-key', $self->{vault_key},
		($params{imds_role} ? ('--imds-role', $params{imds_role}) : ()),
		# STS roles pgphi may assume; their credentials get the documented IAM policy.
		(map { ('--sts-role', "$_=" . kms_policy_file()) } @{ $params{sts_roles} // [] }),
		($params{container_token}
			? ('--container-credentials', '--container-credentials-token', $params{container_token},
				'--container-credentials-ttl', $params{container_ttl} // 3600,
				'--container-credentials-policy', kms_policy_file())
			: ()),
		($params{client_ca} ? ('--client-ca', "$self->{pki}/$params{client_ca}.pem") : ()),
		@{ $params{extra} // [] });
	$self->{handle} = IPC::Run::start(\@cmd, '>', "$self->{state}/stdout", '2>', "$self->{state}/stderr");
	for (1 .. 300)
	{
		last if -s "$self->{state}/port";
		usleep(100_000);
	}
	die "emulator did not start: " . slurp_file("$self->{state}/stderr") unless -s "$self->{state}/port";
	$self->{port} = slurp_file("$self->{state}/port");
	$self->{port} =~ s/\s+//g;
	if ($params{imds_role})
	{
		$self->{imds_port} = slurp_file("$self->{state}/imds_port");
		$self->{imds_port} =~ s/\s+//g;
	}
	return $self;
}

sub url { my ($self) = @_; return "https://127.0.0.1:$self->{port}"; }

sub stop
{
	my ($self) = @_;
	return unless $self->{handle};
	$self->{handle}->kill_kill;
	delete $self->{handle};
}

sub DESTROY { my ($self) = @_; $self->stop; }

# Calls the control API; returns the decoded JSON answer.
sub control
{
	my ($self, $method, $path, $body) = @_;
	my @cmd = ('curl', '-sS', '--max-time', '10', '--cacert', "$self->{pki}/ca.pem",
		'-H', "X-Emulator-Admin: $self->{admin_token}", '-X', $method);
	push @cmd, ('--cert', "$self->{pki}/client.pem", '--key', "$self->{pki}/client.key")
	  if $self->{mtls};
	push @cmd, ('-H', 'Content-Type: application/json', '-d', encode_json($body)) if $body;
	my ($out, $err);
	IPC::Run::run([ @cmd, $self->url . "/_emulator/$path" ], '>', \$out, '2>', \$err)
	  or die "emulator control $path failed: $err";
	return $out =~ /\S/ ? decode_json($out) : {};
}

sub fault { my ($self, %fault) = @_; return $self->control('POST', 'fault', \%fault); }
sub clear_faults { my ($self) = @_; return $self->fault(mode => 'none', target => 'all'); }
sub stats { my ($self) = @_; return $self->control('GET', 'stats'); }
sub reset_stats { my ($self) = @_; return $self->control('POST', 'stats/reset', {}); }

# A signed identity token (JWT) from the emulator's test identity provider:
# for STS web identity (audience sts.amazonaws.com) or Vault's Kubernetes and
# JWT auth. ttl < 0 gives one that has expired.
sub jwt
{
	my ($self, %claims) = @_;
	return $self->control('POST', 'jwt', \%claims)->{token};
}

# A new Vault token, from an AppRole login through the real API.
sub vault_login
{
	my ($self) = @_;
	my ($out, $err);
	IPC::Run::run(
		[ 'curl', '-sS', '--max-time', '10', '--cacert', "$self->{pki}/ca.pem", '-X', 'POST', '-H', 'X-Vault-Request: true',
		  '-d', encode_json({ role_id => $self->{approle}[0], secret_id => $self->{approle}[1] }),
		  $self->url . '/v1/auth/approle/login' ],
		'>', \$out, '2>', \$err) or die "AppRole login failed: $err";
	return decode_json($out)->{auth}{client_token};
}

# A Vault call as the root token (what an operator does by hand), POST
# unless a method is given; returns the decoded answer.
sub vault_api
{
	my ($self, $path, $body, $method) = @_;
	my ($out, $err);
	IPC::Run::run(
		[ 'curl', '-sS', '--max-time', '10', '--cacert', "$self->{pki}/ca.pem", '-X', $method // 'POST',
		  '-H', 'X-Vault-Request: true', '-H', "X-Vault-Token: $self->{vault_root_token}",
		  ($body ? ('-d', encode_json($body)) : ()), $self->url . "/v1/$path" ],
		'>', \$out, '2>', \$err) or die "Vault $path failed: $err";
	return $out =~ /\S/ ? decode_json($out) : {};
}

# The AWS CLI's kms commands as the tests' administrator (no policy at the
# emulator); returns the text output.
sub aws_cli
{
	my ($self, @args) = @_;
	my ($out, $err);
	local $ENV{AWS_ACCESS_KEY_ID} = $self->{aws_admin}[0];
	local $ENV{AWS_SECRET_ACCESS_KEY} = $self->{aws_admin}[1];
	local $ENV{AWS_DEFAULT_REGION} = 'us-east-1';
	local $ENV{AWS_CONFIG_FILE} = '/dev/null';
	local $ENV{AWS_SHARED_CREDENTIALS_FILE} = '/dev/null';
	local $ENV{AWS_EC2_METADATA_DISABLED} = 'true';
	local $ENV{HOME} = $self->{state};
	IPC::Run::run([ '/usr/bin/aws', 'kms', @args, '--endpoint-url', $self->url, '--ca-bundle', "$self->{pki}/ca.pem",
		'--output', 'text' ], '>', \$out, '2>', \$err, IPC::Run::timeout(120))
	  or die "aws kms @args failed: $err";
	return $out;
}

# postgresql.conf lines that point pgphi's Vault and AWS KMS providers at
# this emulator, with a token file and a credentials file written for them.
sub postgres_settings
{
	my ($self) = @_;
	my $token = $self->write_secret('vault-token', $self->{vault_token});
	my $credentials = $self->write_secret('aws-credentials',
		"[default]\naws_access_key_id = $self->{aws}[0]\naws_secret_access_key = $self->{aws}[1]\n");
	my $url = $self->url;
	return <<CONF;
pgphi.vault_addr = '$url'
pgphi.vault_token_file = '$token'
pgphi.vault_ca_file = '$self->{pki}/ca.pem'
pgphi.aws_region = 'us-east-1'
pgphi.aws_kms_endpoint = '$url'
pgphi.aws_credentials_file = '$credentials'
pgphi.aws_use_environment = off
pgphi.aws_ca_file = '$self->{pki}/ca.pem'
CONF
}

# Writes a secret file (mode 0600) and returns its path.
sub write_secret
{
	my ($self, $name, $content) = @_;
	my $path = "$self->{state}/$name";
	open my $fh, '>', $path or die;
	print $fh $content;
	close $fh;
	chmod 0600, $path;
	return $path;
}

1;
