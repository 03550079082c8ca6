module vulcan/guest

go 1.22
